"""Hand-checked values for the fusion rule, fusion/objectives/fusion_rule.py: the weights alpha and
the fused sparse target; and the gold one-hot fill of the sources' outputs (fusion/sources/pool.py).

As in test_losses.py, every expected number is a literal or a math.log / math.exp expression.
"""

from __future__ import annotations

import math

import torch

from fusion.data import IGNORE_INDEX
from fusion.objectives.fusion_rule import SparseTarget, dynamic_weights, fused_target, fusion_weights, merge_duplicates, rule_weights
from fusion.sources.pool import gold_onehot
from tests.test_losses import L, approx

# ---------------------------------------------------------------------------------------------
# dynamic_weights
# ---------------------------------------------------------------------------------------------


def test_dynamic_weights_two_sources_by_hand():
    # u = (1, 0), tau = 1: w = (e / (e + 1), 1 / (e + 1)); CE = (0.5, 2.0), gamma = 1:
    # q = (exp(-0.5), exp(-2)); alpha_0 = e * exp(-0.5) / (e * exp(-0.5) + 1 * exp(-2)).
    u = torch.tensor([[1.0, 0.0]])
    ce = torch.tensor([[0.5, 2.0]])
    alpha = dynamic_weights(u, ce, tau=1.0, gamma=1.0)
    w0, w1 = math.e / (math.e + 1), 1 / (math.e + 1)
    q0, q1 = math.exp(-0.5), math.exp(-2.0)
    a0 = w0 * q0 / (w0 * q0 + w1 * q1)
    assert approx(alpha, [[a0, 1 - a0]])
    assert approx(alpha[0, 0], math.exp(0.5) / (math.exp(0.5) + math.exp(-2.0)))


def test_dynamic_weights_tau_and_gamma_by_hand():
    # tau = 2, gamma = 0.5: w ∝ exp(u / 2), q^gamma = exp(-CE / 2).
    u = torch.tensor([[2.0, 0.0, -2.0]])
    ce = torch.tensor([[1.0, 1.0, 0.0]])
    alpha = dynamic_weights(u, ce, tau=2.0, gamma=0.5)
    # unnormalized: exp(1) * exp(-0.5), exp(0) * exp(-0.5), exp(-1) * exp(0)
    raw = [math.exp(1) * math.exp(-0.5), math.exp(0) * math.exp(-0.5), math.exp(-1) * 1.0]
    assert approx(alpha, [[r / sum(raw) for r in raw]])


def test_dynamic_weights_gamma_zero_is_selector_softmax():
    u = torch.tensor([[0.3, -1.2, 2.0], [1.0, 1.0, 1.0]])
    ce = torch.tensor([[0.1, 5.0, 3.0], [9.0, 0.0, 1.0]])
    for tau in (0.5, 1.0, 3.0):
        alpha = dynamic_weights(u, ce, tau=tau, gamma=0.0)
        assert torch.allclose(alpha, torch.softmax(u / tau, dim=-1), atol=1e-7)
    # second row: equal u -> uniform, whatever the CE
    assert approx(dynamic_weights(u, ce, 1.0, 0.0)[1], [1 / 3, 1 / 3, 1 / 3])


def test_dynamic_weights_large_gamma_tends_to_min_ce():
    # The selector prefers source 0 strongly, but source 2 has the lowest CE: gamma = 50 wins.
    u = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    ce = torch.tensor([[2.0, 1.5, 0.5], [0.7, 0.2, 1.2]])
    alpha = dynamic_weights(u, ce, tau=1.0, gamma=50.0)
    assert torch.allclose(alpha, torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]), atol=1e-9)
    assert approx(alpha.sum(-1), [1.0, 1.0])


# ---------------------------------------------------------------------------------------------
# fused_target
# ---------------------------------------------------------------------------------------------


def dense(target: SparseTarget, vocab: int) -> torch.Tensor:
    """The sparse target scattered back to [B, T, V], for checking against hand values."""
    out = torch.zeros(*target.ids.shape[:-1], vocab)
    present = target.ids >= 0
    return out.scatter_add(-1, target.ids.clamp(min=0), target.probs * present)


def logp(*values: float) -> list[float]:
    return [L(v) if v > 0 else -math.inf for v in values]


def test_fused_target_mixture_quarter_three_quarters():
    # Full-vocabulary supports. P_1 = (0.5, 0.5, 0), P_2 = (0.1, 0.2, 0.7), alpha = (0.25, 0.75):
    # P_F = (0.125 + 0.075, 0.125 + 0.15, 0 + 0.525) = (0.2, 0.275, 0.525)
    ids = torch.arange(3).expand(1, 2, 1, 3)
    logprobs = torch.tensor([logp(0.5, 0.5, 0.0), logp(0.1, 0.2, 0.7)]).view(1, 2, 1, 3)
    fused = fused_target(ids, logprobs, torch.tensor([[0.25, 0.75]]))
    assert fused.ids.shape == (1, 1, 6)  # the union of two supports of 3, duplicates merged
    assert approx(dense(fused, 3)[0, 0], [0.2, 0.275, 0.525])
    assert sorted(fused.ids[0, 0].tolist()) == [-1, -1, -1, 0, 1, 2]


def test_fused_target_union_of_different_top_k_supports_keeps_tails():
    # K=2, V=5. Source 0's top-2 is {3: 0.6, 1: 0.3} (tail 0.1); source 1's is {1: 0.5, 4: 0.25}
    # (tail 0.25). alpha = (0.5, 0.5): P_F(3) = 0.3, P_F(1) = 0.15 + 0.25 = 0.4, P_F(4) = 0.125;
    # fused tail = 0.5 * 0.1 + 0.5 * 0.25 = 0.175 = 1 - 0.825.
    ids = torch.tensor([[3, 1], [1, 4]]).view(1, 2, 1, 2)
    logprobs = torch.tensor([logp(0.6, 0.3), logp(0.5, 0.25)]).view(1, 2, 1, 2)
    fused = fused_target(ids, logprobs, torch.tensor([[0.5, 0.5]]))
    assert approx(dense(fused, 5)[0, 0], [0.0, 0.4, 0.0, 0.3, 0.125])
    assert approx(fused.probs.sum(-1), [[0.825]])
    assert (fused.ids >= 0).sum().item() == 3  # id 1 appears once


def test_union_of_supports_gives_the_true_mixture():
    """Two sources with K = 1: P_1 = (0.9, 0.05, 0.05), P_2 = (0.05, 0.9, 0.05), alpha = (0.5, 0.5).
    Own supports only: (0.45, 0.45) and a tail of 0.1, the tail overstated. Each source's
    log-probability on the union {0, 1}: (0.475, 0.475), tail 0.05, the true mixture."""
    from fusion.sources.pool import _on_union

    p1, p2 = torch.tensor([0.9, 0.05, 0.05]), torch.tensor([0.05, 0.9, 0.05])
    own_ids = torch.tensor([[0], [1]]).view(1, 2, 1, 1)
    own_logprobs = torch.tensor([[L(0.9)], [L(0.9)]]).view(1, 2, 1, 1)
    alpha = torch.tensor([[0.5, 0.5]])
    coarse = fused_target(own_ids, own_logprobs, alpha)
    assert approx(dense(coarse, 3)[0, 0], [0.45, 0.45, 0.0]) and approx(coarse.probs.sum(-1), [[0.9]])
    aligned = torch.ones(1, 2, 1, dtype=torch.bool)
    usable = torch.ones(1, 1, dtype=torch.bool)
    tables = [
        (torch.tensor([0]), torch.tensor([0]), usable, p1.log()[None]),
        (torch.tensor([0]), torch.tensor([1]), usable, p2.log()[None]),
    ]
    ids, logprobs = _on_union(own_ids, aligned, tables)
    assert sorted(ids[0, 0, 0].tolist()) == [0, 1] and torch.equal(ids[0, 0], ids[0, 1])
    exact = fused_target(ids, logprobs, alpha)
    assert approx(dense(exact, 3)[0, 0], [0.475, 0.475, 0.0]) and approx(exact.probs.sum(-1), [[0.95]])


def test_fused_target_renormalizes_alpha_over_aligned_sources():
    # T=2. At t=0 both sources are aligned: alpha (0.25, 0.75). At t=1 source 1 is not:
    # source 0 alone carries the target. A position where neither is aligned has no target.
    ids = torch.tensor([0, 1]).expand(1, 2, 3, 2)
    logprobs = torch.tensor([[logp(1.0, 0.0)] * 3, [logp(0.0, 1.0)] * 3]).view(1, 2, 3, 2)
    aligned = torch.tensor([[[True, True, False], [True, False, False]]])
    fused = fused_target(ids, logprobs, torch.tensor([[0.25, 0.75]]), aligned)
    assert approx(dense(fused, 2)[0], [[0.25, 0.75], [1.0, 0.0], [0.0, 0.0]])
    assert fused.has_target.tolist() == [[True, True, False]]


def test_fused_target_per_row_weights():
    # B=2: alpha = (1, 0) reproduces source 0; (0.5, 0.5) averages.
    ids = torch.arange(2).expand(2, 2, 1, 2)
    logprobs = torch.tensor([logp(1.0, 0.0), logp(0.5, 0.5)]).view(1, 2, 1, 2).expand(2, 2, 1, 2)
    fused = fused_target(ids, logprobs, torch.tensor([[1.0, 0.0], [0.5, 0.5]]))
    assert approx(dense(fused, 2)[:, 0], [[1.0, 0.0], [0.75, 0.25]])


def test_merge_duplicates_sums_repeated_ids_and_keeps_empty_slots_empty():
    ids = torch.tensor([[2, -1, 2, 0, 2]])
    probs = torch.tensor([[0.1, 0.9, 0.2, 0.3, 0.05]])  # the 0.9 sits on an empty slot: dropped
    merged = merge_duplicates(ids, probs)
    pairs = sorted((i, round(p, 6)) for i, p in zip(merged.ids[0].tolist(), merged.probs[0].tolist()) if i >= 0)
    assert pairs == [(0, 0.3), (2, 0.35)]
    assert merged.probs[merged.ids < 0].abs().sum() == 0


# ---------------------------------------------------------------------------------------------
# the weight rules and the skipped sources
# ---------------------------------------------------------------------------------------------


def test_rule_weights_by_hand():
    ce = torch.tensor([[1.0, 2.0, 4.0]])
    e = [math.exp(-1.0), math.exp(-2.0), math.exp(-4.0)]
    assert approx(rule_weights("softmax_ce", None, ce, 1.0, 1.0), [[v / sum(e) for v in e]])
    assert approx(rule_weights("min_ce", None, ce, 1.0, 1.0), [[1.0, 0.0, 0.0]])
    assert approx(rule_weights("equal", None, ce, 1.0, 1.0), [[1 / 3, 1 / 3, 1 / 3]])
    # dynamic: softmax(u / tau - gamma CE) with u = (0, 0, L(2)), tau = 1, gamma = 0: (1/4, 1/4, 1/2).
    quality = torch.tensor([[0.0, 0.0, L(2)]], requires_grad=True)
    alpha = rule_weights("dynamic", quality, ce, 1.0, 0.0)
    assert approx(alpha, [[0.25, 0.25, 0.5]]) and not alpha.requires_grad  # no gradient to the selector


def test_fusion_weights_skip_a_source_and_renormalize():
    # Source 1 skipped on row 0: softmax(-CE) over sources 0 and 2 only, whatever its CE was.
    # Row 1 has no usable source: alpha 0, so no target.
    ce = torch.tensor([[1.0, 0.0, 2.0], [1.0, 1.0, 1.0]])
    valid = torch.tensor([[True, False, True], [False, False, False]])
    alpha = fusion_weights("softmax_ce", None, ce, valid, 1.0, 1.0)
    a0 = math.exp(-1.0) / (math.exp(-1.0) + math.exp(-2.0))
    assert approx(alpha, [[a0, 0.0, 1 - a0], [0.0, 0.0, 0.0]])
    assert approx(fusion_weights("min_ce", None, ce, valid, 1.0, 1.0)[0], [1.0, 0.0, 0.0])  # not the skipped CE of 0
    ids = torch.tensor([0, 1]).expand(2, 3, 1, 2)
    assert fused_target(ids, torch.zeros(2, 3, 1, 2).log_softmax(-1), alpha).has_target.tolist() == [[True], [False]]


# ---------------------------------------------------------------------------------------------
# gold_onehot
# ---------------------------------------------------------------------------------------------


def test_gold_onehot_fills_unaligned_trained_positions_of_usable_sources():
    # B=1, k=2, T=3, K=2. Source 0 is aligned at t=0 only, source 1 nowhere and skipped (not valid);
    # t=2 is not trained. Only source 0 at t=1 is filled: the gold id 7 with probability 1.
    ids = torch.tensor([[[[3, 4], [3, 4], [3, 4]], [[5, 6], [5, 6], [5, 6]]]])
    logprobs = torch.tensor([logp(0.5, 0.25)]).expand(1, 2, 3, 2).clone()
    aligned = torch.tensor([[[True, False, False], [False, False, False]]])
    valid = torch.tensor([[True, False]])
    targets = torch.tensor([[2, 7, IGNORE_INDEX]])
    ids, logprobs, aligned = gold_onehot(ids, logprobs, aligned, valid, targets)
    assert ids.tolist() == [[[[3, 4], [7, -1], [3, 4]], [[5, 6], [5, 6], [5, 6]]]]
    assert logprobs[0, 0, 1].tolist() == [0.0, -math.inf] and torch.equal(logprobs[0, 0, 0], torch.tensor(logp(0.5, 0.25)))
    assert aligned.tolist() == [[[True, True, False], [False, False, False]]]
    assert approx(dense(fused_target(ids, logprobs, torch.tensor([[1.0, 0.0]]), aligned), 8)[0, 1], [0.0] * 7 + [1.0])
