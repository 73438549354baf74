"""The adaptive selection network: a per-source quality predictor and noisy top-k selection.

The selector reads the prompt's features (the student's last hidden states averaged over the
prompt, detached) and predicts, for every source, u_i(x) ~ -CE_i: how well source i will
predict this input's gold tokens. It is trained by regression on the sources whose CE was
observed (a contextual semi-bandit), and picks K = top-k(u + Gumbel noise).
"""

from __future__ import annotations

import torch
from torch import nn


def prompt_features(hidden: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states over prompt tokens, detached. [B, L, D], [B, L] -> [B, D]"""
    weights = prompt_mask.to(hidden.dtype).unsqueeze(-1)
    return ((hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)).detach().float()


class SourceSelector(nn.Module):
    """MLP from prompt features to one predicted quality per source. [B, D] -> [B, N]

    `initial_quality` sets the output bias: the prediction for every source before training
    (a single value, or one per source to start optimistic or pessimistic about some).
    """

    def __init__(self, feature_dim: int, num_sources: int, hidden_dim: int = 64, initial_quality: float | list[float] = -1.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(feature_dim, elementwise_affine=False),
            nn.Linear(feature_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, num_sources),
        )
        with torch.no_grad():
            self.net[-1].weight.mul_(0.1)
            self.net[-1].bias.copy_(torch.as_tensor(initial_quality, dtype=torch.float).expand(num_sources))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


def noisy_top_k(quality: torch.Tensor, k: int, noise_scale: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices of the k best sources per row after adding scaled Gumbel noise. [B, N] -> [B, k]"""
    scores = quality.detach()
    if noise_scale > 0:
        uniform = torch.rand(scores.shape, generator=generator, device=scores.device).clamp(1e-9, 1 - 1e-9)
        scores = scores + noise_scale * -torch.log(-torch.log(uniform))
    return scores.topk(k, dim=-1).indices


def exploration_scale(step: int, start: float, anneal_steps: int) -> float:
    """Gumbel noise scale, annealed linearly from `start` to 0 over `anneal_steps`."""
    if anneal_steps <= 0:
        return 0.0
    return start * max(0.0, 1.0 - step / anneal_steps)
