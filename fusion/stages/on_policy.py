"""On-policy steps: which steps learn along the student's own samples, and the rows a step reads.

With `response_from: student` (GKD), a share `on_policy_fraction` of the steps is on-policy: the
student samples a response to every prompt and the selected sources score each sampled token.
What such a step learns besides the samples is `on_policy_mix`:

    alternate  GKD's batches: the labelled rows' gold CE only. The sources also run along the
               labelled rows' gold, so the selector observes gold CE as in an off-policy step.
    joint      the whole off-policy loss along every prompt's gold or source answer too (as
               MiniLLM keeps its language-modelling term), plus the samples' divergence.

`StepRows` lays a step's rows out in one batch, samples first, so that the sources run once and
the student reads everything in one forward; its methods say which rows each term reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fusion.data import IGNORE_INDEX
from fusion.objectives import fusion_rule
from fusion.sources.pool import SourceOutputs
from fusion.stages.student import pad_right


def is_on_policy_step(step: int, fraction: float) -> bool:
    """Whether step `step` is one of the share `fraction` of on-policy steps (GKD's lambda), evenly
    spread: step s is on-policy when floor((s + 1) f) > floor(s f). No random draw: a resumed run
    decides as the uninterrupted one did."""
    return math.floor((step + 1) * fraction) > math.floor(step * fraction)


@dataclass(frozen=True)
class StepRows:
    """The R rows one training step hands the sources and the student, and where each part sits.

    Off-policy: the B prompts, each along its gold or its source's answer (R = B). On-policy: the
    student's B samples, one per prompt, then the prompts also read along their gold or answer
    (`along`): the labelled ones (`alternate`) or all B (`joint`), so R = B + |along|.
    """

    inputs: dict[str, torch.Tensor]  # input_ids, attention_mask, targets [R, W]
    sources: torch.Tensor  # [R, k]: the sources each row runs, its prompt's
    prompts: int  # B
    samples: int | None  # on-policy: B, the samples' rows come first; off-policy: None
    along: torch.Tensor | None  # on-policy: [B] bool, the prompts with a row along gold or an answer
    joint: bool = False

    @classmethod
    def off_policy(cls, batch: dict, selected: torch.Tensor) -> StepRows:
        inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "targets")}
        return cls(inputs, selected, len(selected), None, None)

    @classmethod
    def on_policy(cls, batch: dict, samples: dict, selected: torch.Tensor, joint: bool, pad_id: int) -> StepRows:
        """The B samples, then the rows of the prompts also read along gold (all of them when
        `joint`), right-padded to one width."""
        labelled = batch["labelled"].to(selected.device)
        along = torch.ones_like(labelled) if joint else labelled
        width = max(samples["input_ids"].shape[1], batch["input_ids"].shape[1])
        pad = {"input_ids": pad_id, "attention_mask": 0, "targets": IGNORE_INDEX}
        inputs = {
            key: torch.cat([pad_right(samples[key], width, value), pad_right(batch[key][along], width, value)])
            for key, value in pad.items()
        }
        return cls(inputs, torch.cat([selected, selected[along]]), len(selected), len(selected), along, joint)

    def along_answers(self, values: torch.Tensor) -> torch.Tensor:
        """Per prompt [B, ...]: the value of its row along gold or an answer; 0 (False) for a
        prompt the step reads along its sample only."""
        if self.samples is None:
            return values
        per_prompt = torch.zeros_like(values[: self.prompts])
        per_prompt[self.along] = values[self.prompts :]
        return per_prompt

    def weighing(self, values: torch.Tensor) -> torch.Tensor:
        """Per prompt [B, ...]: the value of the row whose sources' CE sets the prompt's weights:
        along its gold or answer (off-policy, joint), or along its sample (alternate, whose only
        fused target is on the samples)."""
        return values[self.prompts :] if self.joint else values[: self.prompts]

    def fused_target(self, out: SourceOutputs, alpha: torch.Tensor) -> fusion_rule.SparseTarget:
        """P_F on the first rows, those with a distillation target: the B prompts' rows off-policy,
        the B samples on-policy, and with `joint` the B rows along gold or answers after them,
        each with its prompt's weights alpha [B, k]."""
        rows = 2 * self.prompts if self.joint else self.prompts
        return fusion_rule.fused_target(out.ids[:rows], out.logprobs[:rows], alpha.repeat(rows // self.prompts, 1), out.aligned[:rows])
