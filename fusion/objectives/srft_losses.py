"""SRFT's advantage, entropy-aware weights and losses as pure functions (see `fusion.stages.srft`).

Shapes: B prompts, G rollouts per prompt, T positions, V vocabulary. `*_logp` holds log p of
each position's target token and `*_mask` is 1 on trained positions (response tokens and eos).

Per prompt x with demonstration y* and rollouts y_1..y_G scored r_1..r_G (r* for the demo):

    A_j        = (r_j - mean) / (std + eps)   over the augmented group (rollouts + demo)
    H          = the student's token entropy over the rollouts, detached
                 (granularity: token, sequence or batch; see `entropy_levels`)
    L_SFT_demo = w_SFT * mean_t -log p(y*_t)               w_SFT = 0.5 * exp(sign * H)
    L_RL_demo  = -A_demo * mean_t f(p(y*_t))               f(p) = p / (p + 0.1)   (LUFFY)
    L_RL_self  = -mean_j c_j * A_j * mean_t log p(y_j,t)   c_j = 0.1 * exp(+H) if A_j > 0, else 1
    L_SRFT     = L_SFT_demo + L_RL_demo + L_RL_self

`sft_only` keeps L_SFT_demo alone; `rl_only` (GRPO-style) keeps L_RL_self with the advantage
over the rollouts alone. `constant` weights evaluate the same formulas at H = 0. The sequence
and batch means are of per-sequence token means (each sequence counts once, as in GRPO).

A prompt whose demo has no trained token (an empty answer of a source, `model.demonstrations`)
has no demo: no demo terms (the demo means are over the prompts with one) and the advantage of
its rollouts over the rollouts alone, as in `rl_only`.
"""

from __future__ import annotations

import torch

MODES = ("srft", "sft_only", "rl_only")
WEIGHTS = ("entropy", "constant")
GRANULARITIES = ("token", "sequence", "batch")
TERMS = {"srft": ("sft_demo", "rl_demo", "rl_self"), "sft_only": ("sft_demo",), "rl_only": ("rl_self",)}


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (over `dim`, or everything); 0 where nothing is masked in."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def token_entropy(logp: torch.Tensor) -> torch.Tensor:
    """H_t = -sum_v p_v log p_v in nats, per position, from log-probabilities. [..., V] -> [...]"""
    return -(logp.exp() * logp).sum(-1)


def kl_to_reference(logp: torch.Tensor, reference_logp: torch.Tensor) -> torch.Tensor:
    """KL(pi || pi_ref) = sum_v pi_v (log pi_v - log pi_ref_v) per position, from log-probabilities;
    differentiable in `logp` only. [..., V] x2 -> [...]"""
    return (logp.exp() * (logp - reference_logp.detach())).sum(-1)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """A = (r - mean) / (std + eps) within each group (row). [B, M] -> [B, M]

    The standard deviation is the sample one (divide by M - 1) as in GRPO's reference code; a
    group whose rewards are all equal gets advantage 0 everywhere.
    """
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True, correction=1 if rewards.shape[-1] > 1 else 0)
    return (rewards - mean) / (std + eps)


def entropy_levels(
    demo_entropy: torch.Tensor,  # [B, T] the student's entropy at the demo's positions
    rollout_entropy: torch.Tensor,  # [B, G, T] at the rollouts' positions
    rollout_mask: torch.Tensor,  # [B, G, T]
    granularity: str = "batch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """H for each demo token [B, T] and each rollout token [B, G, T], detached.

    token     every token its own entropy (demo tokens: the entropy at that demo position)
    sequence  a rollout: its own mean token entropy; a demo: the mean over its prompt's rollouts
    batch     one number: the mean token entropy over all rollouts of the batch
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"model.entropy_granularity must be one of {GRANULARITIES}, got {granularity!r}")
    demo_entropy, rollout_entropy = demo_entropy.detach(), rollout_entropy.detach()
    if granularity == "token":
        return demo_entropy, rollout_entropy
    if granularity == "sequence":
        per_rollout = masked_mean(rollout_entropy, rollout_mask, dim=-1)  # [B, G]
        per_prompt = masked_mean(rollout_entropy, rollout_mask, dim=(-2, -1))  # [B]
        return per_prompt[:, None].expand_as(demo_entropy), per_rollout[..., None].expand_as(rollout_entropy)
    overall = masked_mean(rollout_entropy, rollout_mask)
    return overall.expand_as(demo_entropy), overall.expand_as(rollout_entropy)


def sft_weight(entropy: torch.Tensor, coefficient: float = 0.5, sign: int = -1) -> torch.Tensor:
    """w_SFT = coefficient * exp(sign * H): sign -1 as the paper writes it, +1 as its code appears to."""
    return coefficient * torch.exp(sign * entropy)


def rl_weight(entropy: torch.Tensor, advantage: torch.Tensor, coefficient: float = 0.1) -> torch.Tensor:
    """c = coefficient * exp(+H) where the advantage is positive, else 1 (broadcast together)."""
    return torch.where(advantage > 0, coefficient * torch.exp(entropy), torch.ones_like(entropy))


def luffy_shaping(p: torch.Tensor, gamma: float = 0.1) -> torch.Tensor:
    """f(p) = p / (p + gamma): LUFFY's policy shaping of off-policy tokens (gradient f'(p) p = gamma p / (p + gamma)^2)."""
    return p / (p + gamma)


def sft_demo_loss(demo_logp: torch.Tensor, demo_mask: torch.Tensor, w_sft: torch.Tensor) -> torch.Tensor:
    """L_SFT_demo = mean_b mean_t w_SFT * -log p(y*_t), over the demos with a trained token. [B, T] x3 -> scalar"""
    return masked_mean(masked_mean(-w_sft * demo_logp, demo_mask, dim=-1), demo_mask.bool().any(-1))


def rl_demo_loss(demo_logp: torch.Tensor, demo_mask: torch.Tensor, demo_advantage: torch.Tensor, gamma: float = 0.1) -> torch.Tensor:
    """L_RL_demo = -mean_b A_demo,b * mean_t f(p(y*_t)), over the demos with a trained token. [B, T], [B, T], [B] -> scalar"""
    per_demo = demo_advantage.detach() * masked_mean(luffy_shaping(demo_logp.exp(), gamma), demo_mask, dim=-1)
    return -masked_mean(per_demo, demo_mask.bool().any(-1))


def rl_self_loss(rollout_logp: torch.Tensor, rollout_mask: torch.Tensor, advantage: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """L_RL_self = -mean_{b,j} A_bj * mean_t c_bjt log p(y_bj,t). [B, G, T], [B, G, T], [B, G], [B, G, T] -> scalar"""
    return -(advantage.detach() * masked_mean(c.detach() * rollout_logp, rollout_mask, dim=-1)).mean()


def token_statistics(
    logits: torch.Tensor,  # [S, W, V]
    targets: torch.Tensor,  # [S, W], IGNORE_INDEX where untrained
    temperature: float = 1.0,
    reference_logits: torch.Tensor | None = None,  # [S, W, V]
    chunk_size: int = 512,
) -> dict[str, torch.Tensor]:
    """Per trained position, under the policy softmax(logits / T): log p of the target token
    (differentiable), the entropy (detached) and, with reference logits, KL(pi || pi_ref)
    (differentiable). Untrained positions hold 0. -> dict of [S, W]

    Rollouts are scored at the temperature they were sampled at, so that the log-probability
    trained on is the sampling distribution's (the importance ratio is then 1 wherever the
    training forward equals the sampling one: no dropout). Only trained positions are computed,
    `chunk_size` at a time: the backward pass keeps one log-softmax of the trained positions,
    never an [S, W, V] float32 copy of every position, and the entropy is computed without one.
    """
    mask = targets >= 0
    rows, cols = mask.nonzero(as_tuple=True)
    out = {name: logits.new_zeros(targets.shape, dtype=torch.float32) for name in ("logp", "entropy", "kl")}
    for start in range(0, len(rows), chunk_size):
        r, c = rows[start : start + chunk_size], cols[start : start + chunk_size]
        reference = reference_logits[r, c] if reference_logits is not None else None
        logp, entropy, kl = _chunk_statistics(logits[r, c], targets[r, c], temperature, reference)
        out["logp"] = out["logp"].index_put((r, c), logp)
        out["entropy"] = out["entropy"].index_put((r, c), entropy.detach())
        out["kl"] = out["kl"].index_put((r, c), kl)
    return out


def _chunk_statistics(logits, targets, temperature: float, reference):
    logp = torch.log_softmax(logits.float() / temperature, -1)  # [C, V]
    with torch.no_grad():
        entropy = token_entropy(logp)
    kl = torch.zeros_like(entropy)
    if reference is not None:
        kl = kl_to_reference(logp, torch.log_softmax(reference.float() / temperature, -1))
    return logp.gather(-1, targets[:, None]).squeeze(-1), entropy, kl


def srft_loss(
    demo_logp: torch.Tensor,  # [B, T]
    demo_mask: torch.Tensor,  # [B, T]
    demo_entropy: torch.Tensor,  # [B, T]
    rollout_logp: torch.Tensor,  # [B, G, T]
    rollout_mask: torch.Tensor,  # [B, G, T]
    rollout_entropy: torch.Tensor,  # [B, G, T]
    rewards: torch.Tensor,  # [B, G]
    demo_rewards: torch.Tensor,  # [B]
    mode: str = "srft",
    weights: str = "entropy",
    granularity: str = "batch",
    sft_coefficient: float = 0.5,
    sft_sign: int = -1,
    rl_coefficient: float = 0.1,
    shaping: float = 0.1,
    eps: float = 1e-6,
) -> dict[str, torch.Tensor]:
    """The mode's loss and every term, weight and statistic to log (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"model.mode must be one of {MODES}, got {mode!r}")
    if weights not in WEIGHTS:
        raise ValueError(f"model.weights must be one of {WEIGHTS}, got {weights!r}")
    demo_h, rollout_h = entropy_levels(demo_entropy, rollout_entropy, rollout_mask, granularity)
    if weights == "constant":
        demo_h, rollout_h = torch.zeros_like(demo_h), torch.zeros_like(rollout_h)
    alone = group_advantages(rewards, eps)
    group_std = rewards.std(-1, correction=0)
    if mode == "rl_only":  # GRPO: the group is the rollouts alone
        advantage, demo_advantage = alone, torch.zeros_like(demo_rewards)
    else:
        group = torch.cat([rewards, demo_rewards[:, None]], dim=1)  # [B, G + 1], the demo last
        augmented = group_advantages(group, eps)
        has_demo = demo_mask.bool().any(-1)  # [B]; a prompt without a demo: its rollouts alone
        advantage = torch.where(has_demo[:, None], augmented[:, :-1], alone)
        demo_advantage = torch.where(has_demo, augmented[:, -1], torch.zeros_like(demo_rewards))
        group_std = torch.where(has_demo, group.std(-1, correction=0), group_std)
    w_sft = sft_weight(demo_h, sft_coefficient, sft_sign)  # [B, T]
    c = rl_weight(rollout_h, advantage[..., None], rl_coefficient)  # [B, G, T]
    zero = rollout_logp.sum() * 0.0
    terms = {"sft_demo": zero, "rl_demo": zero, "rl_self": zero}
    used = TERMS[mode]
    if "sft_demo" in used:
        terms["sft_demo"] = sft_demo_loss(demo_logp, demo_mask, w_sft)
    if "rl_demo" in used:
        terms["rl_demo"] = rl_demo_loss(demo_logp, demo_mask, demo_advantage, shaping)
    if "rl_self" in used:
        terms["rl_self"] = rl_self_loss(rollout_logp, rollout_mask, advantage, c)
    return {
        "loss": terms["sft_demo"] + terms["rl_demo"] + terms["rl_self"],
        **terms,
        "advantage": advantage,  # [B, G]
        "demo_advantage": demo_advantage,  # [B]
        "entropy": masked_mean(rollout_entropy.detach(), rollout_mask),  # the batch's H, whatever the granularity
        "w_sft": masked_mean(w_sft, demo_mask),
        # The weight a positive-advantage rollout token gets (logged even when none is positive).
        "w_rl": masked_mean(rl_coefficient * torch.exp(rollout_h), rollout_mask),
        "zero_std_groups": (group_std == 0).float().mean(),
    }
