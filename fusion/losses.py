"""The fusion rule and every loss, as pure functions on tensors (no Lightning, no models).

Shapes: B sequences, T positions, V vocabulary, N sources, k selected sources.
A position is trained where `targets != IGNORE_INDEX` (the response tokens and eos).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusion.data import IGNORE_INDEX


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(y_t) of each position's target, 0 where untrained. [B, T, V], [B, T] -> [B, T]"""
    mask = targets != IGNORE_INDEX
    picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, picked, torch.zeros_like(picked))


def sequence_ce(token_logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CE = sum_t m_t (-log p(y_t)) / sum_t m_t per sequence. [B, T] -> [B]"""
    mask = (targets != IGNORE_INDEX).float()
    return -(token_logprobs * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def dynamic_weights(quality: torch.Tensor, ce: torch.Tensor, tau: float, gamma: float) -> torch.Tensor:
    """alpha_i = w_i q_i^gamma / sum_j w_j q_j^gamma with w = softmax(u / tau) and q = exp(-CE).

    Computed in log space: alpha = softmax(u / tau - gamma * CE). [B, k], [B, k] -> [B, k]
    gamma = 0 weighs by the selector alone; gamma -> inf tends to the lowest CE (MinCE).
    """
    return torch.softmax(quality / tau - gamma * ce, dim=-1)


def fused_target(source_probs: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """P_F = sum_i alpha_i P_i, an arithmetic mixture. [B, k, T, V], [B, k] -> [B, T, V]"""
    return torch.einsum("bktv,bk->btv", source_probs, alpha)


def student_loss(
    student_logits: torch.Tensor,  # [B, T, V]
    targets: torch.Tensor,  # [B, T]
    fused: torch.Tensor | None,  # [B, T, V] probabilities at temperature T, or None (plain SFT)
    lam: float = 0.9,
    temperature: float = 1.0,
) -> dict[str, torch.Tensor]:
    """L = lam * CE(y | student) + (1 - lam) * T^2 * KL(sg(P_F^T) || P_student^T), token mean.

    With no fused target this is the plain CE of SFT (lam taken as 1).
    """
    mask = (targets != IGNORE_INDEX).float()
    tokens = mask.sum().clamp(min=1.0)
    ce = -target_logprobs(student_logits, targets).sum() / tokens  # zero at untrained positions
    if fused is None:
        return {"loss": ce, "ce": ce, "kl": torch.zeros_like(ce)}
    fused = fused.detach()
    student_logp = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    kl_per_token = (torch.xlogy(fused, fused) - fused * student_logp).sum(-1)  # [B, T]
    kl = torch.where(mask.bool(), kl_per_token, torch.zeros_like(kl_per_token)).sum() / tokens
    loss = lam * ce + (1.0 - lam) * temperature**2 * kl
    return {"loss": loss, "ce": ce, "kl": kl}


def selector_loss(quality: torch.Tensor, ce: torch.Tensor, observed: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Regression of the predicted quality u_i(x) onto the observed -CE_i, over observed pairs.

    [B, N] predictions, [B, N] CE (detached), [B, N] bool -> scalar
    """
    if kind not in ("mse", "huber"):
        raise ValueError(f"selector loss must be 'mse' or 'huber', got {kind!r}")
    error = (quality - (-ce.detach()))[observed]
    if error.numel() == 0:
        return quality.sum() * 0.0
    if kind == "mse":
        return error.pow(2).mean()
    return F.huber_loss(error, torch.zeros_like(error))


def feedback_loss(selection_probs: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """CV(I)^2 = Var(I) / (Mean(I)^2 + eps) with importance I_j = sum_b pi_bj. [B, N] -> scalar

    Variance over sources is the population variance (divide by N): 0 for a balanced batch,
    N - 1 when every sequence puts all its probability on one source.
    """
    importance = selection_probs.sum(0)
    return importance.var(unbiased=False) / (importance.mean() ** 2 + eps)


def entropy(probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in nats."""
    return -torch.xlogy(probs, probs).sum(dim)
