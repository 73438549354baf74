"""The training stages as LightningModules, and how a trained student is judged.

`student` is what both stages share: the LoRA student, its start, sampling, and `StudentStage`
(the student's logits, evaluation, the optimizer and its schedule, checkpoints).
`fusion` is the distillation stage (`FusionDistillModule`: sources -> fused target -> student),
in parts: `fusion_settings` (its settings and their checks), `routing` (which sources run, the
selector), `answers` (answers for prompts without gold) and `on_policy` (steps along the
student's own samples).
`srft` is the following supervised-plus-reinforcement stage (`SRFTModule`), paid by `rewards`.
`evaluation` answers prompts greedily and scores them, and `metrics` gathers the test metrics.
"""
