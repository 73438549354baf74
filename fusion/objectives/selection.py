"""The adaptive selection network: a per-source quality predictor and noisy top-k selection.

The selector reads the prompt's features (the frozen base student's last hidden states averaged
over the prompt; see `fusion.stages.routing.PromptFeatures`) and predicts, for every source,
u_i(x) ~ -CE_i: how well source i will predict this input's gold tokens. It is trained by regression on the sources whose CE was
observed (a contextual semi-bandit), and picks K = top-k(u + Gumbel noise).
"""

from __future__ import annotations

import torch
from torch import nn

from fusion.objectives.losses import feedback_loss, selector_loss


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


def fit_selector(
    selector: SourceSelector,
    features: torch.Tensor,  # [R, D] prompt features
    ce: torch.Tensor,  # [R, N] each source's observed CE
    observed: torch.Tensor,  # [R, N] bool
    max_steps: int,
    learning_rate: float,
    loss: str = "mse",
    feedback_weight: float = 0.0,
    tau: float = 1.0,
    holdout: float = 0.2,
    every: int = 10,
) -> dict[str, float]:
    """Fit the selector to observed qualities with full-batch AdamW, stopping early.

    The objective is the training step's selector objective: regression of u onto -CE (plus
    `feedback_weight` times the feedback loss, 0 by default: with every source observed nothing
    can collapse, and balancing would only bias u). A fixed `holdout` share of the rows picks
    the number of steps (the lowest held-out regression loss, checked every `every` steps up
    to `max_steps`); the selector is then fitted on every row for that many steps. On a few
    hundred rows more steps overfit: the selector ranks its training prompts right and routes
    new ones worse. The output bias starts at each source's mean observed -CE, so the steps fit
    how quality varies with the prompt. Deterministic.

    Returns the steps taken, the held-out and final regression losses, and the share of rows
    whose top-1 prediction is the source with the lowest observed CE.
    """
    start = {k: v.clone() for k, v in selector.state_dict().items()}
    with torch.no_grad():
        counts = observed.sum(0)
        if loss == "likelihood":  # the log of the mean per-token probability
            mean_quality = torch.log((torch.where(observed, torch.exp(-ce), 0.0).sum(0) / counts.clamp(min=1)).clamp(min=1e-30))
        else:
            mean_quality = torch.where(observed, -ce, 0.0).sum(0) / counts.clamp(min=1)
        key = f"net.{len(selector.net) - 1}.bias"  # the output layer's: one predicted quality per source
        start[key] = torch.where(counts > 0, mean_quality.to(start[key]), start[key])

    def train(rows: torch.Tensor, steps: int, held_out: torch.Tensor | None = None) -> tuple[int, float]:
        selector.load_state_dict(start)
        optimizer = torch.optim.AdamW(selector.parameters(), lr=learning_rate, weight_decay=0.0)
        best_steps, best_loss = 0, float("inf")
        for step in range(steps + 1):
            if held_out is not None and step % every == 0:
                with torch.no_grad():
                    value = float(selector_loss(selector(features[held_out]), ce[held_out], observed[held_out], loss))
                if value < best_loss:
                    best_steps, best_loss = step, value
            if step == steps:
                break
            quality = selector(features[rows])
            objective = selector_loss(quality, ce[rows], observed[rows], loss)
            if feedback_weight:
                objective = objective + feedback_weight * feedback_loss(torch.softmax(quality / tau, -1))
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            optimizer.step()
        return best_steps, best_loss

    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(0))
    size = int(holdout * len(features))
    steps, held_out_loss = max_steps, float("nan")
    if size >= 1 and len(features) - size >= 1:
        steps, held_out_loss = train(order[size:], max_steps, order[:size])
    train(order, steps)
    with torch.no_grad():
        quality = selector(features)
        best = torch.where(observed, -ce, float("-inf")).argmax(-1)
        rows = observed.any(-1)
        agreement = (quality.argmax(-1) == best)[rows].float().mean() if rows.any() else torch.tensor(0.0)
        return {
            "steps": steps,
            "held_out_loss": held_out_loss,
            "selector_loss": float(selector_loss(quality, ce, observed, loss)),
            "top1_agreement": float(agreement),
        }
