"""Evaluation metrics as torchmetrics (synchronized across processes by the library)."""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.text import Perplexity

from fusion.data import IGNORE_INDEX
from fusion.objectives.losses import entropy


class DomainAccuracy(Metric):
    """Exact-match accuracy per domain. State: correct and count [D], summed across processes."""

    full_state_update = False

    def __init__(self, num_domains: int):
        super().__init__()
        self.add_state("correct", torch.zeros(num_domains), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(num_domains), dist_reduce_fx="sum")

    def update(self, domain_index: torch.Tensor, correct: torch.Tensor) -> None:  # [B], [B]
        self.correct.index_add_(0, domain_index, correct.float())
        self.count.index_add_(0, domain_index, torch.ones_like(domain_index, dtype=torch.float))

    def compute(self) -> dict[str, torch.Tensor]:
        # The synchronized count goes out with the accuracy: after compute() the states are local again.
        return {"accuracy": self.correct / self.count.clamp(min=1), "count": self.count.clone()}


class SelectionCounts(Metric):
    """How often each source was selected, per domain. State: counts [D, N], sequences [D]."""

    full_state_update = False

    def __init__(self, num_domains: int, num_sources: int):
        super().__init__()
        self.add_state("counts", torch.zeros(num_domains, num_sources), dist_reduce_fx="sum")
        self.add_state("sequences", torch.zeros(num_domains), dist_reduce_fx="sum")

    def update(self, domain_index: torch.Tensor, selected: torch.Tensor) -> None:  # [B], [B, k]
        one_hot = torch.zeros(selected.shape[0], self.counts.shape[1], device=self.counts.device)
        one_hot.scatter_(1, selected, 1.0)
        self.counts.index_add_(0, domain_index, one_hot)
        self.sequences.index_add_(0, domain_index, torch.ones_like(domain_index, dtype=torch.float))

    def compute(self) -> dict[str, torch.Tensor]:
        share = self.counts / self.sequences.clamp(min=1).unsqueeze(1)  # [D, N], share of a domain's sequences
        return {"share": share, "sequences": self.sequences.clone()}


class EvalMetrics(nn.Module):
    """Exact-match accuracy per domain and mean, response perplexity, selector statistics.

    Under DDP every process holds its part of the split; `compute` (called on every process)
    returns the metrics of the whole split: torchmetrics sums the states across processes.
    """

    def __init__(self, domains: list[str], source_names: list[str]):
        super().__init__()
        self.domains, self.source_names = list(domains), list(source_names)
        self.accuracy = DomainAccuracy(len(self.domains))
        self.perplexity = Perplexity()  # exp(mean NLL of the response tokens)
        self.selection = SelectionCounts(len(self.domains), len(self.source_names)) if self.source_names else None

    def update(self, logits, targets, domains: list[str], correct: list[bool], selected: torch.Tensor | None = None) -> None:
        mask = targets != IGNORE_INDEX
        if mask.any():  # the trained positions only, as one sequence: no [B, T, V] softmax over prompt positions
            self.perplexity.update(logits[mask][None].float(), targets[mask][None])
        index = torch.tensor([self.domains.index(d) for d in domains], device=logits.device)
        self.accuracy.update(index, torch.tensor(correct, dtype=torch.float, device=logits.device))
        if self.selection is not None and selected is not None:
            self.selection.update(index, selected)

    def compute(self) -> dict:
        results: dict = {}
        accuracy = self.accuracy.compute()  # torchmetrics squeezes a one-domain result to 0-d: reshaped back to [D]
        counts = accuracy["count"].reshape(-1).tolist()
        per_domain = {d: float(a) for d, a, n in zip(self.domains, accuracy["accuracy"].reshape(-1), counts) if n > 0}
        results["acc"] = per_domain
        for domain, value in per_domain.items():
            results[f"acc_{domain}"] = value
        results["acc_mean"] = sum(per_domain.values()) / max(1, len(per_domain))
        results["sequences"] = {d: int(n) for d, n in zip(self.domains, counts) if n > 0}
        results["perplexity"] = float(self.perplexity.compute()) if int(self.perplexity.count) > 0 else 1.0
        if self.selection is not None:
            selection = self.selection.compute()
            by_domain = selection["share"].reshape(len(self.domains), len(self.source_names))  # [D, N]
            sequences = selection["sequences"].reshape(-1)  # [D]
            if sequences.sum() > 0:
                share = (by_domain * sequences.unsqueeze(1)).sum(0) / sequences.sum()  # [N]
                results["selection_share"] = dict(zip(self.source_names, share.tolist()))
                results["selection_entropy"] = float(entropy(share / share.sum().clamp(min=1e-12)))
                results["selection_by_domain"] = {
                    d: dict(zip(self.source_names, row.tolist())) for d, row, n in zip(self.domains, by_domain, sequences) if n > 0
                }
        return results

    def reset(self) -> None:
        for metric in [self.accuracy, self.perplexity] + ([self.selection] if self.selection is not None else []):
            metric.reset()
