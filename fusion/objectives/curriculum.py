"""An adaptive curriculum: the training rows of each domain are drawn in proportion to how far
the student trails its sources there, so that optimizer steps go where there is most to learn.

The gap of a row is the probability the sources give the whole response it learns along (gold,
or the answer a source wrote) minus the probability the student gives it, exp(-NLL_sources) -
exp(-NLL_student), each NLL summed over the response's tokens. Exact match needs every token of
an answer right, so sequence probability is what accuracy follows; and unlike a difference of
NLLs it does not grow with the answer's length (a 20-token answer a few nats short weighs no
more than a 2-token one). Per domain, the gap is an exponential moving average over the rows
seen; the sampling weights are

    w_d = floor / D + (1 - floor) * g_d / sum_e g_e,      g_d = max(0, gap_d),

so that every domain keeps at least `floor / D` of the rows (a domain the student already knows
is still rehearsed, and nothing it knew is forgotten) and the rest goes where the gap is. Until
a domain's gap has been observed it counts as the largest observed one; before any observation
the weights are uniform.
"""

from __future__ import annotations

import numpy as np
import torch

from fusion.data import IGNORE_INDEX


@torch.no_grad()
def sequence_nll(logits: torch.Tensor, targets: torch.Tensor, chunk_size: int = 512) -> torch.Tensor:
    """-sum_t log p(y_t) over each row's trained positions. [B, T, V], [B, T] -> [B]

    Only trained positions are computed, `chunk_size` at a time (never a [B, T, V] log-softmax)."""
    rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    nll = torch.zeros(targets.shape[0], device=logits.device)
    for start in range(0, len(rows), chunk_size):
        r, c = rows[start : start + chunk_size], cols[start : start + chunk_size]
        z = logits[r, c].float()  # [C, V]
        nll.index_add_(0, r, torch.logsumexp(z, -1) - z.gather(-1, targets[r, c, None]).squeeze(-1))
    return nll


class DomainCurriculum:
    """Sampling weights per domain from the student's gap to its sources (see the module docstring)."""

    def __init__(self, domains: list[str], floor: float = 0.2, momentum: float = 0.9):
        if not 0.0 < floor <= 1.0 or not 0.0 <= momentum < 1.0:
            raise ValueError(f"model.curriculum_floor must be in (0, 1] and the momentum in [0, 1), got {floor} and {momentum}")
        self.domains, self.floor, self.momentum = list(domains), floor, momentum
        self.gap: list[float | None] = [None] * len(self.domains)

    def update(self, domains: list[str], student_nll: torch.Tensor, source_nll: torch.Tensor) -> None:
        """One batch: rows' domains, the student's and the sources' sequence NLL along each row's response [B]."""
        gaps = (torch.exp(-source_nll) - torch.exp(-student_nll)).clamp(min=0.0).tolist()
        for index, domain in enumerate(self.domains):
            seen = [g for g, d in zip(gaps, domains) if d == domain]
            if seen:
                value = sum(seen) / len(seen)
                old = self.gap[index]
                self.gap[index] = value if old is None else self.momentum * old + (1.0 - self.momentum) * value

    def weights(self) -> np.ndarray:
        """w_d, summing to 1. [D]"""
        observed = [g for g in self.gap if g is not None]
        uniform = np.full(len(self.domains), 1.0 / len(self.domains))
        if not observed:
            return uniform
        gap = np.array([max(observed) if g is None else g for g in self.gap], dtype=np.float64)
        if gap.sum() <= 0:
            return uniform
        return self.floor * uniform + (1.0 - self.floor) * gap / gap.sum()

    def state_dict(self) -> dict:
        return {"domains": self.domains, "gap": list(self.gap)}

    def load_state_dict(self, state: dict) -> None:
        if state["domains"] != self.domains:
            raise ValueError(f"the checkpoint's curriculum is over the domains {state['domains']}, this run's are {self.domains}")
        self.gap = list(state["gap"])
