"""Hand-checked values for every formula in fusion/objectives/losses.py.

Every expected number is written as a literal or a math.log / math.exp expression on tiny
tensors, so a reader can verify it with pencil and paper.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from fusion.data import IGNORE_INDEX
from fusion.objectives.fusion_rule import SparseTarget, merge_duplicates
from fusion.objectives.losses import entropy, feedback_loss, selector_loss, sparse_kl, student_loss, target_logprobs

L = math.log


def approx(value, expected, abs: float = 1e-6) -> bool:
    """True when value (a tensor or number) equals expected (numbers, nested lists) within abs."""
    value = torch.as_tensor(value.detach() if isinstance(value, torch.Tensor) else value, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    return value.shape == expected.shape and bool(torch.allclose(value, expected, rtol=0.0, atol=abs))


def dense_target(probs: torch.Tensor) -> SparseTarget:
    """The whole vocabulary as the support: [B, T, V] probabilities -> ids [B, T, V], no tail."""
    return SparseTarget(torch.arange(probs.shape[-1]).expand_as(probs), probs)


def logits_from_probs(*rows: list[float]) -> torch.Tensor:
    """Logits log(p): softmax(log p) = p for any p that sums to 1 (or is proportional to it)."""
    return torch.tensor([[L(p) for p in row] for row in rows])


# ---------------------------------------------------------------------------------------------
# target_logprobs
# ---------------------------------------------------------------------------------------------


def test_target_logprobs_hand_values_and_ignored_positions():
    # B=1, T=3, V=3. Position 0: p = [1/6, 2/6, 3/6]; position 1: p = [1/4, 1/4, 2/4];
    # position 2 is ignored.
    logits = logits_from_probs([1, 2, 3], [1, 1, 2], [5, 1, 1]).unsqueeze(0)
    targets = torch.tensor([[2, 0, IGNORE_INDEX]])
    out = target_logprobs(logits, targets)
    assert out.shape == (1, 3)
    assert approx(out[0], [L(3 / 6), L(1 / 4), 0.0])


def test_target_logprobs_is_shift_invariant_and_batched():
    # Adding a constant to a row of logits does not change the softmax.
    logits = torch.tensor([[[0.0, 0.0]], [[1.0, 1.0 + L(3)]]])  # [B=2, T=1, V=2]
    targets = torch.tensor([[1], [1]])
    out = target_logprobs(logits, targets)
    assert approx(out, [[L(1 / 2)], [L(3 / 4)]])


def test_sparse_kl_with_a_tail_by_hand():
    # V=4. Target support {0: 0.5, 2: 0.3}, tail 0.2. Student p = (0.25, 0.25, 0.25, 0.25):
    # support terms 0.5 log(0.5/0.25) + 0.3 log(0.3/0.25); tail_S = 0.5 -> 0.2 log(0.2/0.5).
    target = SparseTarget(torch.tensor([[[0, 2]]]), torch.tensor([[[0.5, 0.3]]]))
    student_logp = torch.full((1, 1, 4), L(0.25))
    expected = 0.5 * L(2) + 0.3 * L(0.3 / 0.25) + 0.2 * L(0.2 / 0.5)
    assert approx(sparse_kl(target, student_logp), [[expected]])


def test_confident_student_keeps_the_tail_gradient():
    """Logits (20, 0, 0, 0) against {0: 0.9, tail: 0.1}: the student's tail mass 3e^-20 / (1 + 3e^-20)
    is far below float precision next to 1, yet the loss is its exact value and the gradient
    pulls mass back to the tail (a clamp on 1 - p0 gave 1.06 and a gradient of exactly 0)."""
    logits = torch.tensor([[[20.0, 0.0, 0.0, 0.0]]], requires_grad=True)
    target = SparseTarget(torch.tensor([[[0]]]), torch.tensor([[[0.9]]]))
    kl = sparse_kl(target, torch.log_softmax(logits, -1))
    p0 = 1 / (1 + 3 * math.exp(-20))
    tail = 1 - p0 if 1 - p0 > 0 else 3 * math.exp(-20) / (1 + 3 * math.exp(-20))
    expected = 0.9 * L(0.9 / p0) + 0.1 * (L(0.1) - (L(3) - 20 - math.log1p(3 * math.exp(-20))))
    assert approx(kl, [[expected]]) and abs(float(kl) - 1.5651) < 1e-4
    kl.sum().backward()
    # d KL / d z_j = P_S(j) - Q(j), Q = the target's mass spread over the tail in the student's proportions.
    assert torch.allclose(logits.grad, torch.tensor([[[p0 - 0.9, *[tail / 3 - 0.1 / 3] * 3]]]), atol=1e-6)
    assert float(logits.grad[0, 0, 0]) == pytest.approx(0.1, abs=1e-6)


def test_minus_infinity_student_logit_on_an_empty_slot_is_harmless():
    """An empty support slot (id -1) reads id 0; a -inf student logit there must not make a NaN."""
    logits = torch.tensor([[[float("-inf"), 1.0, 2.0, 3.0]]], requires_grad=True)
    target = SparseTarget(torch.tensor([[[1, -1]]]), torch.tensor([[[0.6, 0.0]]]))
    logp = torch.log_softmax(logits, -1)
    kl = sparse_kl(target, logp)
    p = torch.softmax(torch.tensor([1.0, 2.0, 3.0]), -1)
    assert approx(kl, [[0.6 * L(0.6 / float(p[0])) + 0.4 * L(0.4 / float(p[1] + p[2]))]])
    kl.sum().backward()
    assert torch.isfinite(logits.grad[0, 0, 1:]).all() and float(logits.grad[0, 0, 0]) == 0.0
    # The whole student loss too (it was NaN: the zero that keeps it in the graph was -inf * 0).
    out = student_loss(logits, torch.tensor([[1]]), target, lam=0.5)
    (grad,) = torch.autograd.grad(out["loss"], logits)
    assert approx(out["loss"], 0.5 * -math.log(float(p[0])) + 0.5 * float(kl.sum()), abs=1e-5)
    assert torch.isfinite(grad).all() and float(grad[0, 0, 0]) == 0.0


def test_chunked_student_loss_equals_the_whole_computation():
    """Chunks of trained positions, recomputed in backward: the same loss and gradient as one pass."""
    torch.manual_seed(3)
    logits = torch.randn(3, 7, 11, requires_grad=True)
    targets = torch.randint(0, 11, (3, 7))
    targets[0, :3] = IGNORE_INDEX
    ids = torch.randint(-1, 11, (3, 7, 4))
    fused = merge_duplicates(ids, torch.rand(3, 7, 4) / 4)
    whole = student_loss(logits, targets, fused, lam=0.3, temperature=2.0, chunk_size=1000)
    (grad_whole,) = torch.autograd.grad(whole["loss"], logits)
    chunked = student_loss(logits, targets, fused, lam=0.3, temperature=2.0, chunk_size=2)
    (grad_chunked,) = torch.autograd.grad(chunked["loss"], logits)
    assert approx(chunked["loss"], float(whole["loss"])) and torch.allclose(grad_chunked, grad_whole, atol=1e-6)
    # By hand for one position: lam CE + (1 - lam) T^2 KL at T = 2, over 18 trained tokens.
    mask = targets != IGNORE_INDEX
    ce = -torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0][mask].sum() / mask.sum()
    kl = sparse_kl(fused, torch.log_softmax(logits / 2, -1))[mask].sum() / mask.sum()
    assert approx(whole["loss"], float(0.3 * ce + 0.7 * 4 * kl))
    # No trained position at all: a zero loss that still backpropagates.
    empty = student_loss(logits, torch.full_like(targets, IGNORE_INDEX), fused)
    assert float(empty["loss"]) == 0.0 and torch.autograd.grad(empty["loss"], logits)[0].abs().sum() == 0


def test_sparse_kl_with_full_support_equals_the_dense_kl():
    torch.manual_seed(0)
    p_f = torch.softmax(torch.randn(2, 3, 7), -1)
    student_logp = torch.log_softmax(torch.randn(2, 3, 7), -1)
    dense_kl = (p_f * (p_f.log() - student_logp)).sum(-1)
    assert torch.allclose(sparse_kl(dense_target(p_f), student_logp), dense_kl, atol=1e-6)


def test_sparse_kl_is_a_lower_bound_of_the_dense_kl_on_top_k():
    # Coarsening to {top-3} + tail can only lose information (data-processing inequality).
    torch.manual_seed(1)
    p_f = torch.softmax(2 * torch.randn(4, 5, 50), -1)
    student_logp = torch.log_softmax(torch.randn(4, 5, 50), -1)
    top = p_f.topk(3, -1)
    coarse = sparse_kl(SparseTarget(top.indices, top.values), student_logp)
    full = (p_f * (p_f.log() - student_logp)).sum(-1)
    assert torch.all(coarse <= full + 1e-6) and torch.all(coarse > 0)


# ---------------------------------------------------------------------------------------------
# student_loss
# ---------------------------------------------------------------------------------------------


def _student_case():
    """B=1, T=3, V=2; position 2 is ignored (its logits and fused target are garbage).

    t=0: student p = (1/4, 3/4), gold 1 -> CE = log(4/3); P_F = (1/2, 1/2)
         KL = 1/2 log((1/2)/(1/4)) + 1/2 log((1/2)/(3/4)) = 1/2 log 2 + 1/2 log(2/3)
    t=1: student p = (1/2, 1/2), gold 0 -> CE = log 2;   P_F = (1, 0)
         KL = 1 * log(1 / (1/2)) = log 2   (0 log 0 = 0)
    """
    logits = logits_from_probs([1, 3], [1, 1], [100, 1]).unsqueeze(0)
    targets = torch.tensor([[1, 0, IGNORE_INDEX]])
    fused = torch.tensor([[[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]]])
    ce = (L(4 / 3) + L(2)) / 2
    kl = ((0.5 * L(2) + 0.5 * L(2 / 3)) + L(2)) / 2
    return logits, targets, dense_target(fused), ce, kl


def test_student_loss_by_hand_default_lambda():
    logits, targets, fused, ce, kl = _student_case()
    out = student_loss(logits, targets, fused, lam=0.9, temperature=1.0)
    assert approx(out["ce"], ce)
    assert approx(out["kl"], kl)
    assert approx(out["loss"], 0.9 * ce + 0.1 * kl)


def test_student_loss_other_lambda():
    logits, targets, fused, ce, kl = _student_case()
    out = student_loss(logits, targets, fused, lam=0.25)
    assert approx(out["loss"], 0.25 * ce + 0.75 * kl)
    # lam = 0: pure distillation
    assert approx(student_loss(logits, targets, fused, lam=0.0)["loss"], kl)


def test_student_loss_without_fused_target_is_plain_ce():
    logits, targets, _, ce, _ = _student_case()
    out = student_loss(logits, targets, None, lam=0.3, temperature=4.0)
    assert approx(out["loss"], ce)
    assert approx(out["ce"], ce)
    assert approx(out["kl"], 0.0)


def test_student_loss_lambda_one_ignores_kl():
    logits, targets, fused, ce, kl = _student_case()
    out = student_loss(logits, targets, fused, lam=1.0)
    assert approx(out["loss"], ce)
    assert approx(out["kl"], kl)  # still reported
    # a completely different target leaves the loss unchanged
    other = dense_target(torch.tensor([[[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]]))
    assert approx(student_loss(logits, targets, other, lam=1.0)["loss"], ce)


def test_student_loss_temperature_two_scaling():
    # One token, V=2. Logits (0, log 9): at T=1 p = (1/10, 9/10), gold 1 -> CE = log(10/9).
    # At T=2 the logits are (0, log 3): p^T = (1/4, 3/4); P_F = (1/2, 1/2):
    # KL = 1/2 log 2 + 1/2 log(2/3); loss = lam CE + (1 - lam) * 2^2 * KL.
    logits = torch.tensor([[[0.0, L(9)]]])
    targets = torch.tensor([[1]])
    fused = dense_target(torch.tensor([[[0.5, 0.5]]]))
    kl = 0.5 * L(2) + 0.5 * L(2 / 3)
    out = student_loss(logits, targets, fused, lam=0.9, temperature=2.0)
    assert approx(out["ce"], L(10 / 9))
    assert approx(out["kl"], kl)
    assert approx(out["loss"], 0.9 * L(10 / 9) + 0.1 * 4.0 * kl)


def test_student_loss_ignored_positions_do_not_matter():
    logits, targets, fused, _, _ = _student_case()
    base = student_loss(logits, targets, fused)["loss"]
    logits2, probs2 = logits.clone(), fused.probs.clone()
    logits2[0, 2] = torch.tensor([-50.0, 50.0])
    probs2[0, 2] = torch.tensor([1.0, 0.0])
    fused2 = SparseTarget(fused.ids, probs2)
    assert approx(student_loss(logits2, targets, fused2)["loss"], base.item())


def test_student_loss_fused_target_gets_no_gradient():
    logits, targets, fused, _, _ = _student_case()
    logits = logits.clone().requires_grad_(True)
    probs = fused.probs.clone().requires_grad_(True)
    student_loss(logits, targets, SparseTarget(fused.ids, probs), lam=0.5)["loss"].backward()
    assert probs.grad is None
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert torch.all(logits.grad[0, 2] == 0)  # the ignored position gets nothing


def test_student_loss_kl_gradient_by_hand():
    # d/dz [T^2 KL(P_F || softmax(z/T))] = T (softmax(z/T) - P_F). With lam = 0, one token,
    # T = 2, z = (0, log 9): p^T = (1/4, 3/4), P_F = (1/2, 1/2) -> grad = 2 * (-1/4, 1/4).
    logits = torch.tensor([[[0.0, L(9)]]], requires_grad=True)
    fused = dense_target(torch.tensor([[[0.5, 0.5]]]))
    student_loss(logits, torch.tensor([[1]]), fused, lam=0.0, temperature=2.0)["loss"].backward()
    assert approx(logits.grad[0, 0], [-0.5, 0.5])


# ---------------------------------------------------------------------------------------------
# selector_loss
# ---------------------------------------------------------------------------------------------


def _selector_case():
    # B=2, N=3. Observed pairs: (0, 0), (0, 1), (1, 1). Errors u + CE: -0.5, 2.0, 0.0.
    u = torch.tensor([[-1.0, 1.0, -3.0], [0.0, -0.5, 5.0]])
    ce = torch.tensor([[0.5, 1.0, 9.0], [1.0, 0.5, 9.0]])
    observed = torch.tensor([[True, True, False], [False, True, False]])
    return u, ce, observed


def test_selector_loss_mse_by_hand():
    u, ce, observed = _selector_case()
    assert approx(selector_loss(u, ce, observed), (0.25 + 4.0 + 0.0) / 3)
    assert approx(selector_loss(u, ce, observed, kind="mse"), (0.25 + 4.0 + 0.0) / 3)


def test_selector_loss_unobserved_pairs_do_not_matter():
    u, ce, observed = _selector_case()
    base = selector_loss(u, ce, observed).item()
    u2, ce2 = u.clone(), ce.clone()
    u2[~observed] = torch.tensor([100.0, -7.0, 3.0])
    ce2[~observed] = torch.tensor([0.0, 42.0, -1.0])
    assert approx(selector_loss(u2, ce2, observed), base)
    assert approx(selector_loss(u2, ce2, observed, kind="huber"), selector_loss(u, ce, observed, kind="huber").item())


def test_selector_loss_huber_by_hand():
    # Huber with delta 1: 0.5 e^2 for |e| <= 1, |e| - 0.5 otherwise.
    u, ce, observed = _selector_case()
    assert approx(selector_loss(u, ce, observed, kind="huber"), (0.5 * 0.25 + (2.0 - 0.5) + 0.0) / 3)


def test_selector_loss_gradient_only_to_quality_on_observed():
    u, ce, observed = _selector_case()
    u = u.clone().requires_grad_(True)
    ce = ce.clone().requires_grad_(True)
    selector_loss(u, ce, observed).backward()
    assert ce.grad is None  # CE is detached
    # d/du mean(e^2) = 2 e / n on observed pairs, 0 elsewhere
    assert approx(u.grad, [[2 * -0.5 / 3, 2 * 2.0 / 3, 0.0], [0.0, 0.0, 0.0]])


def test_selector_loss_no_observed_pairs_is_zero_with_gradient():
    u = torch.tensor([[0.3, -2.0]], requires_grad=True)
    ce = torch.tensor([[1.0, 2.0]])
    observed = torch.zeros(1, 2, dtype=torch.bool)
    for kind in ("mse", "huber"):
        loss = selector_loss(u, ce, observed, kind=kind)
        assert loss.item() == 0.0
        assert loss.requires_grad
        loss.backward()
        assert torch.all(u.grad == 0)
        u.grad = None


def test_selector_loss_bad_kind_raises():
    u, ce, observed = _selector_case()
    with pytest.raises(ValueError, match="mse"):
        selector_loss(u, ce, observed, kind="l1")


# ---------------------------------------------------------------------------------------------
# feedback_loss
# ---------------------------------------------------------------------------------------------


def test_feedback_loss_balanced_is_zero():
    # uniform rows
    assert approx(feedback_loss(torch.full((5, 4), 0.25)), 0.0)
    # one-hot rows, but each source used once: importance (1, 1, 1, 1)
    assert approx(feedback_loss(torch.eye(4)), 0.0)


def test_feedback_loss_all_on_one_source_is_n_minus_one():
    # N = 4, B = 3: importance (3, 0, 0, 0), mean 3/4,
    # population variance ((9/4)^2 + 3 (3/4)^2) / 4 = 27/16, CV^2 = (27/16) / (9/16) = 3.
    pi = torch.zeros(3, 4)
    pi[:, 2] = 1.0
    assert approx(feedback_loss(pi), 3.0, abs=1e-5)


def test_feedback_loss_unbalanced_by_hand():
    # N = 2, B = 1: I = (0.75, 0.25), mean 0.5, var ((0.25)^2 + (0.25)^2) / 2 = 1/16 -> 0.25.
    assert approx(feedback_loss(torch.tensor([[0.75, 0.25]])), 0.25)
    # N = 3, B = 2: I = (1, 0.5, 0.5), mean 2/3, var ((1/3)^2 + 2 (1/6)^2) / 3 = 1/18,
    # CV^2 = (1/18) / (4/9) = 1/8.
    pi = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.0, 0.5]])
    assert approx(feedback_loss(pi), 1 / 8)


def test_feedback_loss_gradient_pushes_toward_balance():
    # Gradient descent on CV^2 lowers the over-used source's logit and raises the others.
    logits = torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.0, -1.0]], requires_grad=True)
    feedback_loss(torch.softmax(logits, -1)).backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.all(logits.grad[:, 0] > 0)
    assert torch.all(logits.grad[:, 1:] < 0)


# ---------------------------------------------------------------------------------------------
# entropy
# ---------------------------------------------------------------------------------------------


def test_entropy_by_hand():
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.25, 0.25, 0.0]])
    # log 4; 0 (0 log 0 = 0, no NaN); -(1/2 log 1/2 + 2 * 1/4 log 1/4) = 1.5 log 2
    assert approx(entropy(probs), [L(4), 0.0, 1.5 * L(2)])


def test_entropy_dim_argument():
    probs = torch.tensor([[0.5, 1.0], [0.5, 0.0]])  # columns are distributions
    assert approx(entropy(probs, dim=0), [L(2), 0.0])


@pytest.mark.parametrize("lam,temperature", [(0.3, 1.0), (0.0, 1.0), (0.9, 2.0), (0.5, 0.5)])
def test_closed_form_gradient_equals_autograd_through_the_sparse_kl(lam, temperature):
    """The chunk's gradient, formed in the forward pass, against autograd through log-softmax and sparse_kl."""
    torch.manual_seed(int(lam * 10 + temperature))
    logits = (torch.randn(3, 7, 11) * 3).requires_grad_()
    logits.data[2, 4] = torch.tensor([200.0] + [0.0] * 10)  # tail_S below exp(-80): the rows done apart
    targets = torch.randint(0, 11, (3, 7))
    targets[0, :3] = IGNORE_INDEX
    ids = torch.randint(-1, 11, (3, 7, 4))
    ids[1, 2] = -1  # a trained position without a target: CE only
    ids[2, 4] = torch.tensor([0, -1, -1, -1])
    fused = merge_duplicates(ids, torch.rand(3, 7, 4) / 4)
    out = student_loss(logits, targets, fused, lam=lam, temperature=temperature, chunk_size=5)
    (grad,) = torch.autograd.grad(out["loss"], logits)
    mask = targets != IGNORE_INDEX
    ce = -torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0][mask].sum() / mask.sum()
    kl = sparse_kl(fused, torch.log_softmax(logits / temperature, -1))[mask].sum() / mask.sum()
    reference = lam * ce + (1 - lam) * temperature**2 * kl
    (expected,) = torch.autograd.grad(reference, logits)
    assert approx(out["loss"], float(reference), abs=1e-5)
    assert approx(out["ce"], float(ce), abs=1e-5) and approx(out["kl"], float(kl), abs=1e-5)
    assert torch.allclose(grad, expected, atol=1e-5), float((grad - expected).abs().max())
    assert grad[2, 4].abs().sum() > 1e-3  # the confident row still learns its tail (over 18 tokens)


def test_the_losses_and_the_fusion_rule_load_no_lightning():
    """They read IGNORE_INDEX from `fusion.data`, which imports nothing, not from the datamodule."""
    import subprocess
    import sys

    code = (
        "import sys, fusion.objectives.losses, fusion.objectives.fusion_rule; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'reasoning_gym'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("probs", [[1.0], [1.0 + 3e-8]])  # a one-hot target; one whose float32 mass sums just above 1
def test_gradient_is_finite_when_the_target_has_no_tail_and_the_student_none_off_it(probs):
    """No tail in the target and the student's mass off the support below float32's range:
    d/dz = lam (p - onehot) + (1 - lam) (p - q) is exactly 0 on the target id and p_v (tiny) elsewhere."""
    from fusion.objectives.losses import student_loss

    logits = torch.tensor([[[0.0, -90.0, -90.0, -90.0]]], requires_grad=True)
    target = SparseTarget(torch.tensor([[[0]]]), torch.tensor([[probs]]))
    out = student_loss(logits, torch.tensor([[0]]), target, lam=0.5)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and torch.isfinite(logits.grad).all()
    p = torch.softmax(logits.detach(), -1)[0, 0]
    assert logits.grad[0, 0].tolist() == pytest.approx([0.0, *p[1:].tolist()], abs=1e-45)


def test_loss_is_finite_with_minus_infinite_logits_at_several_positions():
    """The zero that keeps the graph when nothing is trained must not turn -inf logits into NaN."""
    from fusion.objectives.losses import divergence_loss, student_loss

    logits = torch.zeros(1, 3, 2)
    logits[..., 0] = float("-inf")
    logits.requires_grad_(True)
    out = student_loss(logits, torch.tensor([[1, 1, IGNORE_INDEX]]), None)
    out["loss"].backward()
    assert out["loss"].item() == 0.0 and torch.isfinite(logits.grad).all()
    target = SparseTarget(torch.tensor([[[1], [1], [1]]]), torch.tensor([[[1.0], [1.0], [1.0]]]))
    assert divergence_loss(logits, torch.tensor([[1, 1, IGNORE_INDEX]]), target, "reverse_kl").item() == pytest.approx(0.0)
    nothing = student_loss(logits, torch.full((1, 3), IGNORE_INDEX), None)["loss"]
    assert nothing.item() == 0.0 and nothing.requires_grad
