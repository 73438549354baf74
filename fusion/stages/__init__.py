"""The training stages as LightningModules, and how a trained student is judged.

`student` is what both stages share: the LoRA student, its start, sampling and the schedule.
`fusion` is the distillation stage (`FusionDistillModule`: sources -> fused target -> student);
`srft` is the following supervised-plus-reinforcement stage (`SRFTModule`), paid by `rewards`.
`evaluation` answers prompts greedily and scores them, and `metrics` gathers the test metrics.
"""
