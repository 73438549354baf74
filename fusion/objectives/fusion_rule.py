"""The fusion rule: how the selected sources' distributions become the target P_F.

Here: the weights alpha (`fusion_weights`, by the method's rule of `fusion.objectives.methods`),
and the mixture on the union of supports (`fused_target`, a `SparseTarget`). The sources'
distributions come from `fusion.sources`; the losses are `fusion.objectives.losses`.

Shapes: B sequences, T positions, k selected sources, K ids kept per source and position.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

SKIPPED_CE = 1e4  # the CE a weight rule sees for a skipped source (its weight is then masked to 0)


def dynamic_weights(quality: torch.Tensor, ce: torch.Tensor, tau: float, gamma: float) -> torch.Tensor:
    """alpha_i = w_i q_i^gamma / sum_j w_j q_j^gamma with w = softmax(u / tau) and q = exp(-CE).

    Computed in log space: alpha = softmax(u / tau - gamma * CE). [B, k], [B, k] -> [B, k]
    gamma = 0 weighs by the selector alone; gamma -> inf tends to the lowest CE (MinCE).
    """
    return torch.softmax(quality / tau - gamma * ce, dim=-1)


def rule_weights(rule: str, quality: torch.Tensor | None, ce: torch.Tensor, tau: float, gamma: float) -> torch.Tensor:
    """alpha over the selected sources by a method's rule (`Method.weights`). [B, k] -> [B, k]

    dynamic: `dynamic_weights` of the selector's quality (no gradient to the selector through
    alpha) and the CE; softmax_ce: softmax(-CE) (AvgCE); min_ce: one-hot of the lowest CE
    (MinCE); equal: 1 / k.
    """
    if rule == "dynamic":
        return dynamic_weights(quality.detach(), ce, tau, gamma)
    if rule == "softmax_ce":
        return torch.softmax(-ce, dim=-1)
    if rule == "min_ce":
        return torch.nn.functional.one_hot(ce.argmin(-1), ce.shape[-1]).float()
    return torch.full_like(ce, 1.0 / ce.shape[-1])  # equal


def fusion_weights(
    rule: str, quality: torch.Tensor | None, ce: torch.Tensor, valid: torch.Tensor, tau: float, gamma: float
) -> torch.Tensor:
    """`rule_weights` over the sources usable on each row. [B, k] x3 -> [B, k]

    A source with non-finite logits on a sequence (`valid` False) is skipped there: weight 0, and
    alpha renormalized over the others. A sequence left with no usable source gets alpha 0, so no
    target (`fused_target`).
    """
    alpha = rule_weights(rule, quality, ce.masked_fill(~valid, SKIPPED_CE), tau, gamma) * valid
    return alpha / alpha.sum(-1, keepdim=True).clamp(min=1e-12)


class SparseTarget(NamedTuple):
    """A distribution over the student vocabulary kept on a small support per position.

    ids [B, T, M] student token ids, -1 for an empty slot (each id at most once per position);
    probs [B, T, M] their probabilities, 0 on empty slots. The mass missing from 1 is the
    *tail*: the probability the target puts on every token outside the support. A position
    whose support is empty has no target (no KL there).
    """

    ids: torch.Tensor
    probs: torch.Tensor

    @property
    def has_target(self) -> torch.Tensor:
        return (self.ids >= 0).any(-1)  # [B, T]


def merge_duplicates(ids: torch.Tensor, probs: torch.Tensor) -> SparseTarget:
    """Sum the probabilities of repeated ids along the last axis. [..., M] -> SparseTarget [..., M]

    The ids are sorted and each run of equal ids is summed into its first slot; the other slots
    become empty (-1, 0). Empty slots (-1) in the input stay empty.
    """
    probs = torch.where(ids >= 0, probs, torch.zeros_like(probs))
    ids_sorted, order = ids.sort(-1)
    probs_sorted = probs.gather(-1, order)
    first = torch.ones_like(ids_sorted, dtype=torch.bool)
    first[..., 1:] = ids_sorted[..., 1:] != ids_sorted[..., :-1]
    group = first.long().cumsum(-1) - 1  # the slot of each id's first occurrence, in run order
    merged = torch.zeros_like(probs_sorted).scatter_add(-1, group, probs_sorted)
    merged_ids = torch.full_like(ids_sorted, -1).scatter(-1, group, ids_sorted)
    # The run of -1 (empty slots) sorts first; keep it empty.
    return SparseTarget(merged_ids, torch.where(merged_ids >= 0, merged, torch.zeros_like(merged)))


def fused_target(ids: torch.Tensor, logprobs: torch.Tensor, alpha: torch.Tensor, aligned: torch.Tensor | None = None) -> SparseTarget:
    """P_F = sum_i alpha_i P_i on the union of the selected sources' top-K supports.

    ids [B, k, T, K] student ids (-1 empty), logprobs [B, k, T, K] at temperature T, alpha [B, k],
    aligned [B, k, T] (False where source i has no distribution at position t: its alpha is
    renormalized over the sources that do). -> SparseTarget [B, T, k * K]
    A position where no source has weight has no target; a row whose alpha is all zero (every
    source skipped) has none anywhere.

    Each source's own tail (the mass beyond its top-K) is carried by the fused tail, so the
    support and the tail together are a distribution: sum_i alpha_i (top-K_i + tail_i) = 1.
    Never builds a [B, k, T, V] tensor.
    """
    batch, k, length, top = ids.shape
    weight = alpha[:, :, None].expand(batch, k, length)  # [B, k, T]
    if aligned is not None:
        weight = weight * aligned
        weight = weight / weight.sum(1, keepdim=True).clamp(min=1e-12)
    probs = logprobs.exp().nan_to_num(0.0) * weight[..., None]  # exp(-inf) = 0 on empty slots
    ids = torch.where(weight[..., None] > 0, ids, -1)  # a source with no weight adds no support
    ids = ids.permute(0, 2, 1, 3).reshape(batch, length, k * top)
    probs = probs.permute(0, 2, 1, 3).reshape(batch, length, k * top)
    return merge_duplicates(ids, probs)
