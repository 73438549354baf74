"""Every loss, as pure functions on tensors (no Lightning, no models): the divergences between the
fused target and the student, the student loss and a training step's student terms
(`student_terms`), the selector's regression and feedback losses.
The target itself (weights, `SparseTarget`, `fused_target`) is built in `fusion.objectives.fusion_rule`.

Shapes: B sequences, T positions, V vocabulary, N sources, k selected sources.
A position is trained where `targets != IGNORE_INDEX` (the response tokens and eos).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from fusion.data import IGNORE_INDEX
from fusion.objectives.fusion_rule import SparseTarget


def zero_in_graph(logits: torch.Tensor) -> torch.Tensor:
    """A 0 that carries `logits`' graph (a loss with no trained position still backpropagates),
    finite whatever the logits hold (-inf, inf or NaN: x * 0 would be NaN, and a sum of clamped
    -inf overflows), with a zero gradient."""
    return torch.nan_to_num(logits.reshape(-1)[:1].float() * 0.0, nan=0.0, posinf=0.0, neginf=0.0).sum()


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(y_t) of each position's target, 0 where untrained. [B, T, V], [B, T] -> [B, T]"""
    mask = targets != IGNORE_INDEX
    picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, picked, torch.zeros_like(picked))


def log_mass_outside(logp: torch.Tensor, ids: torch.Tensor, present: torch.Tensor, exact_below: float = 1e-4) -> torch.Tensor:
    """log of the probability `logp` puts outside a support. [..., V], [..., M], [..., M] -> [...]

    log(1 - mass on the support) where that mass leaves at least `exact_below` outside; where it
    leaves less (a confident student), float32 cannot represent 1 - mass, so those positions get
    a logsumexp over the other ids instead: exact, with a gradient, however small the tail. A
    support that is the whole vocabulary has no outside: 0 there (its tail weight is 0), never
    a NaN gradient.
    """
    inside = torch.where(present, logp.gather(-1, ids.clamp(min=0)).exp(), 0.0).sum(-1)  # [...]
    close = inside > 1.0 - exact_below
    result = torch.log1p(-inside.clamp(max=1.0 - exact_below))
    if close.any():  # the rare confident positions: a pass over their whole vocabulary
        rows = close.nonzero(as_tuple=True)
        in_support = torch.zeros_like(logp[rows]).scatter_add(-1, ids[rows].clamp(min=0), present[rows].to(logp.dtype)) > 0
        everything = in_support.all(-1, keepdim=True)
        outside = logp[rows].masked_fill(in_support & ~everything, float("-inf")).masked_fill(everything, 0.0)
        result = result.index_put(rows, torch.logsumexp(outside, dim=-1))
    return result


EMPTY_LOG = -1e4  # the log-probability of an empty cell: probability 0 in float32, never -inf (no NaN in a gradient)


class _Partition(NamedTuple):
    """Target and student on the partition {support ids} + {tail} (`_support_and_tail`).

    present [..., M]: the slot holds an id;
    p [..., M]: the target's probability of each support id, 0 on empty slots;
    log_q [..., M]: the student's log-probability of each, EMPTY_LOG on empty slots;
    p_tail [...]: the target's tail, 1 - its mass on the support (at least 0);
    log_q_tail [...]: the student's log mass outside the support (`log_mass_outside`; 0 where
    the support is the whole vocabulary).
    """

    present: torch.Tensor
    p: torch.Tensor
    log_q: torch.Tensor
    p_tail: torch.Tensor
    log_q_tail: torch.Tensor


def _support_and_tail(ids: torch.Tensor, probs: torch.Tensor, student_logp: torch.Tensor) -> _Partition:
    """The cells every sparse divergence compares the target and the student on. [..., M] x2, [..., V]"""
    present = ids >= 0
    safe = ids.clamp(min=0)
    p = torch.where(present, probs, 0.0)
    log_q = torch.where(present, student_logp.gather(-1, safe), EMPTY_LOG)  # no -inf * 0 on an empty slot
    p_tail = (1.0 - p.sum(-1)).clamp(min=0.0)
    return _Partition(present, p, log_q, p_tail, log_mass_outside(student_logp, safe, present))


def sparse_kl(target: SparseTarget, student_logp: torch.Tensor) -> torch.Tensor:
    """KL(P_F || P_S) on the partition {support ids} + {tail}, per position. -> [B, T]

    sum_{v in support} P_F(v) log(P_F(v) / P_S(v)) + tail_F log(tail_F / tail_S), with
    tail_F = 1 - the target's mass on the support and log tail_S the student's log mass outside
    it (`log_mass_outside`). This is the exact KL between the two distributions coarsened to
    that partition. When the target is the true distribution on its support (online, the union
    of the selected sources' supports) it is a lower bound of the full KL; from the cache,
    where each source keeps only its own top-K, it is not (see `fusion.sources.cache`). Empty support
    slots (id -1) count nothing, whatever the student's log-probability there.
    """
    partition = _support_and_tail(target.ids, target.probs, student_logp)
    support = (torch.xlogy(partition.p, partition.p) - partition.p * partition.log_q).sum(-1)
    tail = torch.xlogy(partition.p_tail, partition.p_tail) - partition.p_tail * partition.log_q_tail
    return torch.where(target.has_target, support + tail, torch.zeros_like(support))


def student_loss(
    student_logits: torch.Tensor,  # [B, T, V]
    targets: torch.Tensor,  # [B, T]
    fused: SparseTarget | None,  # P_F at temperature T on a sparse support, or None (plain SFT)
    lam: float = 0.9,
    temperature: float = 1.0,
    chunk_size: int = 512,
) -> dict[str, torch.Tensor]:
    """L = lam * CE(y | student) + (1 - lam) * T^2 * KL(sg(P_F^T) || P_student^T), token mean.

    The KL is `sparse_kl` and counts zero where a position has no target (an unaligned
    position); both terms are divided by the number of trained tokens. With no fused target
    this is the plain CE of SFT (lam taken as 1). "ce" and "kl" are returned detached, for logging.

    Only trained positions are computed, `chunk_size` at a time, and each chunk's gradient with
    respect to its logits is formed in the forward pass (`_ChunkLoss`), in closed form: the
    backward pass keeps one [chunk, V] float32 tensor per chunk, what plain SFT's log-softmax
    keeps, and runs no softmax backward.
    """
    mask = targets != IGNORE_INDEX
    tokens = mask.sum().clamp(min=1).float()
    rows, cols = mask.nonzero(as_tuple=True)  # the P trained positions
    if fused is None:
        lam = 1.0
    loss = zero_in_graph(student_logits)  # in the graph when no position is trained
    ce, kl = loss.detach().clone(), loss.detach().clone()
    for start in range(0, len(rows), chunk_size):
        r, c = rows[start : start + chunk_size], cols[start : start + chunk_size]
        ids = fused.ids[r, c] if fused is not None else None
        probs = fused.probs[r, c].detach() if fused is not None else None
        part, part_ce, part_kl = _ChunkLoss.apply(student_logits[r, c], targets[r, c], ids, probs, lam, temperature)
        loss, ce, kl = loss + part, ce + part_ce, kl + part_kl
    return {"loss": loss / tokens, "ce": ce / tokens, "kl": kl / tokens}


class _ChunkLoss(torch.autograd.Function):
    """Summed lam * CE + (1 - lam) * T^2 * sparse KL over one chunk of positions, [C, V] logits.

    With p = softmax(z), p^T = softmax(z / T) and q^T the target spread over the vocabulary as
    the sparse KL sees it (P_F(v) on the support; tail_F * p^T_v / tail_S off it), the gradient is
        d/dz = lam * (p - onehot(y)) + (1 - lam) * T * (p^T - q^T),
    exact for any tail (the student's log tail mass comes from `log_mass_outside`). The forward
    pass writes it into the log-softmax's own buffer, so nothing else of size [C, V] is kept.
    Returns (loss, ce, kl); only the loss has a gradient, and only once (the saved gradient is
    scaled in place: no backward through the graph a second time, no double backward).
    """

    @staticmethod
    def forward(ctx, logits, targets, ids, probs, lam: float, temperature: float):
        z = logits.float()
        logp = torch.log_softmax(z, -1)  # [C, V], becomes the gradient in place
        ce = -logp.gather(-1, targets[:, None]).sum()
        kl = ce.new_zeros(())
        if ids is None:
            grad = logp.exp_().mul_(lam)
        elif temperature == 1.0:
            kl, grad = _kl_grad_(logp, ids, probs, lam, (1.0 - lam))
        else:
            kl, kl_grad = _kl_grad_(torch.log_softmax(z / temperature, -1), ids, probs, 0.0, (1.0 - lam) * temperature)
            grad = logp.exp_().mul_(lam).add_(kl_grad)
            del kl_grad
        grad.scatter_add_(-1, targets[:, None], torch.full((len(targets), 1), -lam, dtype=grad.dtype, device=grad.device))
        ctx.save_for_backward(grad)
        ctx.dtype = logits.dtype
        loss = lam * ce + (1.0 - lam) * temperature**2 * kl
        ce, kl = ce.clone(), kl.clone()
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        (grad,) = ctx.saved_tensors  # used once (no double backward): scaled in place
        return grad.mul_(grad_loss).to(ctx.dtype), None, None, None, None, None


def _kl_grad_(logp: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor, base: float, b: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse KL summed over the rows that have a target, and `logp` [C, V] turned in place into
    (base + b) * p - b * q on those rows, base * p on the others.

    q is the target over the whole vocabulary as the sparse KL sees it: P_F on the support ids,
    and off the support the target's tail shared in proportion to the student, tail_F * p_v / tail_S.
    """
    partition = _support_and_tail(ids, probs, logp)  # the student's log tail exact however small
    present, p_f, logp_s, tail_f, log_tail = partition
    has = present.any(-1)  # [C] rows with a target
    tail_term = torch.where(tail_f > 0, torch.xlogy(tail_f, tail_f) - tail_f * log_tail, 0.0)  # no tail: 0, whatever log tail_S
    kl_rows = (torch.xlogy(p_f, p_f) - p_f * logp_s).sum(-1) + tail_term
    kl = torch.where(has, kl_rows, 0.0).sum()
    b_rows = torch.where(has, b, 0.0)  # [C]
    a_rows = base + b_rows
    # Off the support: a p_v - b tail_F p_v / tail_S = p_v (a - b exp(log tail_F - log tail_S)).
    # Where the target has no tail the ratio is 0 (never 0 * inf, however small tail_S); where it
    # overflows float32 (above exp(80)) those rare rows are computed apart.
    log_ratio = torch.where(tail_f > 0, torch.log(tail_f.clamp(min=1e-38)) - log_tail, float("-inf"))
    huge = (log_ratio > 80.0) & has
    factor = a_rows - b_rows * torch.exp(torch.where(huge, 0.0, log_ratio))
    exact = None
    if huge.any():
        rows = huge.nonzero(as_tuple=True)[0]
        exact = a_rows[rows, None] * logp[rows].exp() - b * torch.exp(logp[rows] + log_ratio[rows, None])
    grad = logp.exp_().mul_(factor[:, None])
    if exact is not None:
        grad[rows] = exact
    # On the support: a p_v - b P_F(v) (the support ids of a row are distinct).
    r, m = present.nonzero(as_tuple=True)
    grad[r, ids[r, m]] = a_rows[r] * logp_s[r, m].exp() - b_rows[r] * p_f[r, m]
    return kl, grad


DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
TARGET_FLOOR = 1e-8  # the least probability reverse KL lets the target have (see `sparse_divergence`)


def sparse_divergence(target: SparseTarget, student_logp: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """D(P_F, P_S) per position on the partition {support ids} + {tail}, as `sparse_kl`. -> [...]

    P = P_F is the teacher (the fused target), Q = P_S the student; both are coarsened to the
    support's ids and one tail bucket: P's tail is 1 - its mass on the support, Q's is its mass
    outside the support (`log_mass_outside`), so the student's mass off the support is compared
    with the target's tail mass, never dropped.

        forward_kl  KL(P || Q) = sum_c P_c log(P_c / Q_c)                       (= `sparse_kl`)
        reverse_kl  KL(Q || P) = sum_c Q_c log(Q_c / max(P_c, TARGET_FLOOR))
        jsd         JSD_beta(P || Q) = beta KL(P || M) + (1 - beta) KL(Q || M),  M = beta P + (1 - beta) Q

    summed over the cells c (support ids and the tail). Reverse KL is infinite where the target
    has no mass and the student has some (an empty tail, e.g. `unaligned: gold_onehot`): the
    target is floored at TARGET_FLOOR there, a large finite cost. The JSD follows TRL's
    GKDTrainer: JSD_beta / beta -> KL(P || Q) as beta -> 0 and JSD_beta / (1 - beta) -> KL(Q || P)
    as beta -> 1 (0 < beta < 1 here: use forward_kl or reverse_kl at the ends); it is bounded,
    needs no floor. Positions without a target count 0. Differentiable in `student_logp`.
    """
    if kind == "forward_kl":
        return sparse_kl(target, student_logp)
    partition = _support_and_tail(target.ids, target.probs, student_logp)
    p = torch.cat([partition.p, partition.p_tail[..., None]], -1)  # [..., M + 1], the tail last
    # Empty cells get log EMPTY_LOG (probability 0 in float32), not -inf: no NaN in any gradient.
    log_p = torch.where(p > 0, p.clamp(min=1e-30).log(), EMPTY_LOG)
    whole = partition.present.sum(-1, keepdim=True) >= student_logp.shape[-1]  # the support is the vocabulary: no tail
    log_tail = torch.where(whole, EMPTY_LOG, partition.log_q_tail[..., None].clamp(min=EMPTY_LOG))
    log_q = torch.cat([partition.log_q, log_tail], -1)
    q = log_q.exp()
    if kind == "reverse_kl":
        cells = q * (log_q - p.clamp(min=TARGET_FLOOR).log())
    elif kind == "jsd":
        log_m = torch.logaddexp(math.log(beta) + log_p, math.log(1.0 - beta) + log_q)
        cells = beta * p * (log_p - log_m) + (1.0 - beta) * q * (log_q - log_m)
    else:
        raise ValueError(f"model.divergence must be one of {DIVERGENCES}, got {kind!r}")
    return torch.where(target.has_target, cells.sum(-1), torch.zeros_like(p[..., 0]))


def divergence_loss(
    student_logits: torch.Tensor,  # [B, T, V]
    targets: torch.Tensor,  # [B, T]: the trained positions (!= IGNORE_INDEX)
    fused: SparseTarget,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 512,
) -> torch.Tensor:
    """T^2 * D(sg(P_F^T), P_student^T) (`sparse_divergence`), mean over the trained positions.

    Forward KL uses `student_loss`'s closed-form gradient (lam = 0); reverse KL and JSD use
    autograd on the student's log-softmax, `chunk_size` positions at a time ([chunk, V] kept per
    chunk for the backward pass).
    """
    if kind == "forward_kl":
        return student_loss(student_logits, targets, fused, 0.0, temperature, chunk_size)["loss"]
    mask = targets != IGNORE_INDEX
    rows, cols = mask.nonzero(as_tuple=True)
    total = zero_in_graph(student_logits)  # in the graph when no position is trained
    for start in range(0, len(rows), chunk_size):
        r, c = rows[start : start + chunk_size], cols[start : start + chunk_size]
        logp = torch.log_softmax(student_logits[r, c].float() / temperature, -1)
        chunk = SparseTarget(fused.ids[r, c], fused.probs[r, c].detach())
        total = total + sparse_divergence(chunk, logp, kind, beta).sum()
    return temperature**2 * total / mask.sum().clamp(min=1).float()


def student_terms(
    logits: torch.Tensor,  # [R, W, V]
    targets: torch.Tensor,  # [R, W]
    fused: SparseTarget,  # on the first rows, those with a distillation target
    lam: float,
    temperature: float = 1.0,
    kind: str = "forward_kl",
    beta: float = 0.5,
    samples: int | None = None,
    joint: bool = False,
) -> dict[str, torch.Tensor]:
    """The student's loss lam * CE + (1 - lam) * D of a training step, with "ce" and "divergence"
    (D, which holds T^2: `divergence_loss`) detached for logging. Each term is a mean over the
    trained positions of the rows it reads:

        off-policy (`samples` None): CE and D over every row, along gold or a source's answer
            (forward KL with `student_loss`'s closed-form gradient, in one pass);
        on-policy: D over the first `samples` rows (the student's own samples), CE over the rest
            (the labelled rows' gold);
        joint: the off-policy loss over the rows after the samples (gold or source answers, with
            their targets) plus (1 - lam) * D over the samples ("divergence" is the samples').
    """
    if joint:
        rest = student_terms(logits[samples:], targets[samples:], SparseTarget(*(t[samples:] for t in fused)), lam, temperature, kind, beta)
        sampled = SparseTarget(*(t[:samples] for t in fused))
        divergence = divergence_loss(logits[:samples], targets[:samples], sampled, kind, beta, temperature)
        return {"loss": rest["loss"] + (1.0 - lam) * divergence, "ce": rest["ce"], "divergence": divergence.detach()}
    if samples is None and kind == "forward_kl":
        terms = student_loss(logits, targets, fused, lam, temperature)
        return {"loss": terms["loss"], "ce": terms["ce"], "divergence": terms["kl"]}
    gold, end = (samples, samples) if samples is not None else (0, len(targets))
    ce = student_loss(logits[gold:], targets[gold:], None)["loss"]
    divergence = divergence_loss(logits[:end], targets[:end], fused, kind, beta, temperature)
    return {"loss": lam * ce + (1.0 - lam) * divergence, "ce": ce.detach(), "divergence": divergence.detach()}


SELECTOR_LOSSES = ("mse", "huber", "likelihood")


def selector_loss(quality: torch.Tensor, ce: torch.Tensor, observed: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Regression of the predicted quality u_i(x) onto the observed -CE_i, over observed pairs.

    "mse" and "huber" fit u to -CE, so u tends to the mean -CE of a source on prompts like x.
    "likelihood" fits exp(u) to exp(-CE) by squared error, so u tends to the log of the mean
    probability (the module passes each response's sequence NLL as CE there, so exp(-CE) is the
    probability of the whole response): a source that is usually right and now and then
    confidently wrong (CE near 0, sometimes 10) outranks one that is always unsure (CE 0.6), as
    its accuracy does; under "mse" the rare large CEs decide.

    [B, N] predictions, [B, N] CE (detached), [B, N] bool -> scalar
    """
    if kind not in SELECTOR_LOSSES:
        raise ValueError(f"model.selector_loss must be one of {SELECTOR_LOSSES}, got {kind!r}")
    if kind == "likelihood":
        error = (quality.exp() - torch.exp(-ce.detach()))[observed]
        return error.pow(2).mean() if error.numel() else quality.sum() * 0.0
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
