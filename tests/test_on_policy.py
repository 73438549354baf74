"""On-policy fusion: the divergences against hand values, the student's samples as the data the
sources score (never a path for gradients), the reward signal of the selector, and bad settings.

Expected numbers are literals or math expressions a reader can check with pencil and paper.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from fusion.data import IGNORE_INDEX
from fusion.data.datamodule import collate, encode
from fusion.objectives import losses
from fusion.stages.fusion import FusionDistillModule
from fusion.stages.on_policy import is_on_policy_step
from fusion.stages.rewards import answer_format
from fusion.stages.routing import reward_observations

# ------------------------------------------------------------------ divergences, by hand

# Target P and student Q over a 4-token vocabulary; the target keeps tokens {0, 1}, so its tail
# is 0.2 = P(2) + P(3) and the student's tail is Q(2) + Q(3) = 0.3.
P = [0.5, 0.3]
Q = [0.2, 0.5, 0.1, 0.2]
P_CELLS, Q_CELLS = [0.5, 0.3, 0.2], [0.2, 0.5, 0.3]


def _target(ids=(0, 1), probs=P) -> losses.SparseTarget:
    return losses.SparseTarget(torch.tensor([list(ids)]), torch.tensor([list(probs)]))


def _student() -> torch.Tensor:
    return torch.log(torch.tensor([Q]))


def test_forward_kl_hand_value():
    expected = sum(p * math.log(p / q) for p, q in zip(P_CELLS, Q_CELLS))
    assert float(losses.sparse_divergence(_target(), _student(), "forward_kl")) == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.5 * math.log(2.5) + 0.3 * math.log(0.6) + 0.2 * math.log(2 / 3))


def test_reverse_kl_hand_value_and_its_floor():
    expected = 0.2 * math.log(0.2 / 0.5) + 0.5 * math.log(0.5 / 0.3) + 0.3 * math.log(0.3 / 0.2)
    assert float(losses.sparse_divergence(_target(), _student(), "reverse_kl")) == pytest.approx(expected, abs=1e-6)
    # A target without tail (one-hot on token 0): the student's 0.8 off it costs log(0.8 / 1e-8).
    onehot = losses.sparse_divergence(_target((0, -1), (1.0, 0.0)), _student(), "reverse_kl")
    assert float(onehot) == pytest.approx(0.2 * math.log(0.2) + 0.8 * math.log(0.8 / losses.TARGET_FLOOR), rel=1e-5)


def test_jsd_hand_value_and_its_ends():
    beta = 0.3
    mixture = [beta * p + (1 - beta) * q for p, q in zip(P_CELLS, Q_CELLS)]  # [0.29, 0.44, 0.27]
    expected = beta * sum(p * math.log(p / m) for p, m in zip(P_CELLS, mixture)) + (1 - beta) * sum(
        q * math.log(q / m) for q, m in zip(Q_CELLS, mixture)
    )
    assert float(losses.sparse_divergence(_target(), _student(), "jsd", beta)) == pytest.approx(expected, abs=1e-6)
    # JSD_beta / beta -> KL(P || Q) as beta -> 0, JSD_beta / (1 - beta) -> KL(Q || P) as beta -> 1.
    forward, reverse = (float(losses.sparse_divergence(_target(), _student(), kind)) for kind in ("forward_kl", "reverse_kl"))
    assert float(losses.sparse_divergence(_target(), _student(), "jsd", 1e-4)) / 1e-4 == pytest.approx(forward, rel=5e-3)
    assert float(losses.sparse_divergence(_target(), _student(), "jsd", 1 - 1e-4)) / 1e-4 == pytest.approx(reverse, rel=5e-3)


def test_divergence_loss_is_the_token_mean_times_t_squared_with_the_hand_gradient():
    """Two trained positions (the second's target is P, the first has none) and one untrained:
    the mean counts both trained positions; reverse KL's gradient in the logits is the
    closed form q_c (log(q_c / p_c) - KL) on each cell, shared within the tail as q_v / q_tail."""
    logits = torch.log(torch.tensor([[Q, Q, Q]])).requires_grad_()
    fused = losses.SparseTarget(torch.tensor([[[-1, -1], [0, 1], [0, 1]]]), torch.tensor([[[0.0, 0.0], P, P]]))
    targets = torch.tensor([[5, 5, IGNORE_INDEX]])
    loss = losses.divergence_loss(logits, targets, fused, "reverse_kl", temperature=1.0)
    kl = 0.2 * math.log(0.2 / 0.5) + 0.5 * math.log(0.5 / 0.3) + 0.3 * math.log(0.3 / 0.2)
    assert float(loss) == pytest.approx(kl / 2, abs=1e-6)
    loss.backward()
    cell = {0: (0.2, 0.5), 1: (0.5, 0.3), 2: (0.3, 0.2)}  # cell -> (q, p); tokens 2 and 3 share the tail cell
    expected = [cell[c][0] * (math.log(cell[c][0] / cell[c][1]) - kl) for c in (0, 1)]
    expected += [q / 0.3 * cell[2][0] * (math.log(0.3 / 0.2) - kl) for q in (0.1, 0.2)]
    assert torch.allclose(logits.grad[0, 1], torch.tensor(expected) / 2, atol=1e-6)
    assert float(logits.grad[0, 0].abs().max()) == 0.0 and float(logits.grad[0, 2].abs().max()) == 0.0
    # At T = 2 the student is read at z / 2 and the divergence scaled by 4.
    hot = losses.divergence_loss(torch.log(torch.tensor([[Q]])), torch.tensor([[5]]), _target_3d(), "jsd", 0.5, temperature=2.0)
    student_t = torch.log_softmax(torch.log(torch.tensor([Q])) / 2.0, -1)
    assert float(hot) == pytest.approx(4.0 * float(losses.sparse_divergence(_target(), student_t, "jsd", 0.5)), abs=1e-6)


def _target_3d() -> losses.SparseTarget:
    return losses.SparseTarget(torch.tensor([[[0, 1]]]), torch.tensor([[P]]))


def test_forward_kl_divergence_loss_is_the_hand_kl_token_mean_times_t_squared():
    """At T = 1.5 the logits 1.5 log Q read exactly Q. Three trained positions: two with target P
    on {0, 1} (tail 0.2, the student's 0.3), one with 0.6 on token 0 and 0.3 on token 2 (tail 0.1,
    the student's Q(1) + Q(3) = 0.7); an untrained position counts nothing. The gradient in the
    logits is T (Q - P_F) / 3 per trained position, P_F spreading its tail over the tokens off
    its support as the student does (Q_v / Q_tail)."""
    t = 1.5
    logits = (t * torch.log(torch.tensor([[Q, Q], [Q, Q]]))).requires_grad_()
    ids = torch.tensor([[[0, 1], [0, 2]], [[0, 1], [0, 1]]])
    probs = torch.tensor([[P, [0.6, 0.3]], [P, P]])
    targets = torch.tensor([[1, 2], [0, IGNORE_INDEX]])
    loss = losses.divergence_loss(logits, targets, losses.SparseTarget(ids, probs), "forward_kl", temperature=t)
    kl_p = 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.5) + 0.2 * math.log(0.2 / 0.3)
    kl_b = 0.6 * math.log(0.6 / 0.2) + 0.3 * math.log(0.3 / 0.1) + 0.1 * math.log(0.1 / 0.7)
    assert float(loss) == pytest.approx(t**2 * (2 * kl_p + kl_b) / 3, abs=1e-6)
    loss.backward()
    target_p = [0.5, 0.3, 0.2 * 0.1 / 0.3, 0.2 * 0.2 / 0.3]  # P, its tail 0.2 shared by tokens 2 and 3 as 0.1 : 0.2
    target_b = [0.6, 0.1 * 0.5 / 0.7, 0.3, 0.1 * 0.2 / 0.7]  # the tail 0.1 shared by tokens 1 and 3 as 0.5 : 0.2
    expected = torch.tensor(
        [[[t * (q - p) / 3 for q, p in zip(Q, target)] for target in row] for row in ((target_p, target_b), (target_p, Q))]
    )
    expected[1, 1] = 0.0  # untrained
    assert torch.allclose(logits.grad, expected, atol=1e-6)


# ------------------------------------------------------------------ the module, on the tiny zoo

ROWS = [
    {"prompt": "backward abc=", "response": "cba", "domain": "spell_backward", "metadata": None},
    {"prompt": "backward dog=", "response": None, "domain": "spell_backward", "metadata": None},
    {"prompt": "3 + 4=", "response": None, "domain": "chain_sum", "metadata": None},
]


def _module(zoo: str, **kwargs) -> FusionDistillModule:
    sources = [os.path.join(zoo, n) for n in ("spell", "sum", "noise")]
    settings = {
        "oracle": {"spell_backward": "spell", "chain_sum": "sum"},
        "response_max_new_tokens": 8,
        "sample_max_new_tokens": 6,
        **kwargs,
    }
    module = FusionDistillModule(student=os.path.join(zoo, "student"), sources=sources, **settings)
    module.log_dict = lambda values, **kw: module.logged.update({k: float(v) for k, v in values.items()})
    module.log = lambda *a, **kw: None
    module.logged = {}
    return module


def _batch(module: FusionDistillModule, rows=ROWS) -> dict:
    return collate([encode(module.tokenizer, r["prompt"], r["response"], 32) | {"row": r} for r in rows], module.tokenizer.pad_token_id)


def _prefer(module: FusionDistillModule, bias: list[float]) -> None:
    with torch.no_grad():  # the selector's prediction, the same for every prompt
        module.selector.net[-1].weight.zero_()
        module.selector.net[-1].bias.copy_(torch.tensor(bias))


def _cells(logp: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Target P and student Q on the cells {support ids} + {tail} of one position, in float64,
    and each token's cell [V] (its slot, or the tail: the last cell)."""
    present = ids >= 0
    support, p_support = ids[present], probs[present].double()
    cell = torch.full((logp.shape[-1],), len(support), dtype=torch.long)
    cell[support] = torch.arange(len(support))
    q = torch.zeros(len(support) + 1, dtype=torch.float64).index_add_(0, cell, logp.exp())
    p = torch.cat([p_support, (1.0 - p_support.sum()).clamp(min=0.0)[None]])
    return p, q, cell


def _cell_divergence(p: torch.Tensor, q: torch.Tensor, kind: str, beta: float = 0.5) -> float:
    """D(P, Q) summed over the cells: the definitions, the target floored at 1e-8 in reverse KL."""
    if kind == "forward_kl":
        return float((torch.xlogy(p, p) - torch.xlogy(p, q)).sum())
    if kind == "reverse_kl":
        return float((torch.xlogy(q, q) - q * p.clamp(min=1e-8).log()).sum())
    m = beta * p + (1 - beta) * q
    return float(beta * (torch.xlogy(p, p) - torch.xlogy(p, m)).sum() + (1 - beta) * (torch.xlogy(q, q) - torch.xlogy(q, m)).sum())


def _reference_on_policy_loss(logits, targets, fused, samples: int, lam: float, kind: str, beta: float = 0.5):
    """An on-policy step's student loss at T = 1, by the formulas: lam * the gold rows' CE (token
    mean) + (1 - lam) * D(P_F, student) over the first `samples` rows' trained positions (token
    mean). -> (loss, its gradient in the logits, float64; the reverse KL's in closed form,
    q_v (log(Q_c / P_c) - KL) for token v in cell c, CE's softmax - onehot)."""
    logp = torch.log_softmax(logits.detach().double(), -1)
    grad = torch.zeros_like(logp)
    trained = targets != IGNORE_INDEX
    sampled = trained.clone()
    sampled[samples:] = False
    gold = trained & ~sampled
    divergence, ce = 0.0, 0.0
    for r, t in sampled.nonzero().tolist():
        p, q, cell = _cells(logp[r, t], fused.ids[r, t], fused.probs[r, t])
        value = _cell_divergence(p, q, kind, beta)
        divergence += value
        if kind == "reverse_kl":
            grad[r, t] = (1 - lam) / int(sampled.sum()) * logp[r, t].exp() * ((q / p.clamp(min=1e-8)).log()[cell] - value)
    for r, t in gold.nonzero().tolist():
        ce -= float(logp[r, t, targets[r, t]])
        grad[r, t] = lam / int(gold.sum()) * (logp[r, t].exp() - torch.nn.functional.one_hot(targets[r, t], logp.shape[-1]))
    return lam * ce / int(gold.sum()) + (1 - lam) * divergence / int(sampled.sum()), grad


def _capture_student_terms(monkeypatch) -> dict:
    """Record what the step hands `losses.student_terms`: the logits (their gradient kept), the
    targets, the fused target and the number of sample rows."""
    captured, original = {}, losses.student_terms

    def student_terms(logits, targets, fused, *args):
        logits.retain_grad()
        captured.update(logits=logits, targets=targets, fused=fused, samples=args[4] if len(args) > 4 else None)
        return original(logits, targets, fused, *args)

    monkeypatch.setattr(losses, "student_terms", student_terms)
    return captured


def test_on_policy_step_trains_on_what_the_sources_score(tiny_zoo, monkeypatch):
    """The sources run on the student's samples (then the labelled row's gold), the student's
    forward reads the same rows, the loss is lam * CE(gold) + (1 - lam) * JSD(samples) plus the
    selector's regression, and the logs count the sampled tokens."""
    module = _module(tiny_zoo, fusion="selector", top_k=2, response_from="student", divergence="jsd")
    captured = _capture_student_terms(monkeypatch)
    _prefer(module, [-1.0, -2.0, -5.0])
    module.router.prefitted = True  # a fitted selector explores no more: no noise on the labelled row's selection
    samples, seen = {}, {}
    sample, run = module.sample, module.pool.run

    def record_sample(batch):
        samples.update(sample(batch))
        return samples

    def record_run(selected, batch, *args, **kwargs):
        seen.update(selected=selected.clone(), **{k: batch[k].clone() for k in ("input_ids", "targets")})
        return run(selected, batch, *args, **kwargs)

    module.sample, module.pool.run = record_sample, record_run
    batch = _batch(module)
    loss = module.training_step(batch, 0)
    assert module.logged["train/on_policy"] == 1.0 and captured["samples"] == 3
    expected, _ = _reference_on_policy_loss(captured["logits"], captured["targets"], captured["fused"], 3, 0.9, "jsd", 0.5)
    assert module.logged["train/loss_student"] == pytest.approx(expected, rel=1e-5)
    assert float(loss) == pytest.approx(expected + module.logged["train/loss_selector"], rel=1e-5)  # fitted: no feedback term
    width = samples["input_ids"].shape[1]
    assert torch.equal(seen["input_ids"][:3, :width], samples["input_ids"]) and torch.equal(seen["targets"][:3, :width], samples["targets"])
    # The labelled row follows along its gold; every row runs the selector's two sources.
    gold = batch["input_ids"][0]
    assert torch.equal(seen["input_ids"][3, : len(gold)], gold) and seen["input_ids"].shape[0] == 4
    assert seen["selected"].tolist() == [[0, 1]] * 4
    # Trained positions are the sampled tokens up to the first eos: each prompt's completion.
    for b in range(3):
        trained = seen["targets"][b][seen["targets"][b] != IGNORE_INDEX]
        assert trained.tolist() == samples["input_ids"][b][samples["attention_mask"][b].bool()][-len(trained) :].tolist()
        assert len(trained) == int(samples["length"][b]) >= 1
    assert module.logged["train/sampled_tokens"] == float(samples["length"].sum())
    assert "train/answered" not in module.logged  # no source wrote an answer: the student answered


def test_no_gradient_flows_through_the_sampling(tiny_zoo, monkeypatch):
    """The student samples without gradient (no forward of `generate` builds a graph), and the
    step's loss and its gradient are those of the formulas on the sampled tokens as fixed data:
    its value is lam * CE(gold) + (1 - lam) * reverse KL(samples), its gradient in the training
    forward's logits the closed form, and every adapter parameter's gradient exactly that
    gradient backpropagated through the training forward alone."""
    module = _module(tiny_zoo, fusion="oracle", response_from="student", divergence="reverse_kl")
    with torch.no_grad():
        for name, parameter in module.student.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)  # a non-zero adapter: gradients reach lora_A as well
    batch = _batch(module)
    phase, sampling_forwards = ["train"], []

    def record(m, args, out):
        if phase[0] == "sample":
            sampling_forwards.append((torch.is_grad_enabled(), out.logits.requires_grad))

    module.student.get_base_model().register_forward_hook(record)
    sample = module.sample

    def sample_and_mark(b):
        phase[0] = "sample"
        try:
            return sample(b)
        finally:
            phase[0] = "train"

    module.sample = sample_and_mark
    inputs, logits_of = {}, module.logits

    def training_logits(input_ids, attention_mask=None):
        inputs.update(input_ids=input_ids, attention_mask=attention_mask)
        return logits_of(input_ids, attention_mask)

    module.logits = training_logits
    captured = _capture_student_terms(monkeypatch)
    params = [p for p in module.student.parameters() if p.requires_grad]
    module.zero_grad()
    torch.manual_seed(0)
    loss = module.training_step(batch, 0)
    loss.backward()
    # One forward per sampled token, none with gradient: the samples are data.
    assert len(sampling_forwards) >= 2 and sampling_forwards == [(False, False)] * len(sampling_forwards)
    assert captured["samples"] == 3 and inputs["input_ids"].shape[0] == 4  # 3 samples, then the labelled row's gold
    expected, expected_grad = _reference_on_policy_loss(captured["logits"], captured["targets"], captured["fused"], 3, 0.9, "reverse_kl")
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert torch.allclose(captured["logits"].grad.double(), expected_grad, atol=1e-7)
    through_training = torch.autograd.grad(logits_of(inputs["input_ids"], inputs["attention_mask"]), params, expected_grad.float())
    assert any(float(g.abs().max()) > 0 for g in through_training)
    assert all(torch.allclose(p.grad, g, atol=1e-6) for p, g in zip(params, through_training))


def test_joint_step_is_the_off_policy_step_plus_the_samples_divergence(tiny_zoo):
    """`on_policy_mix: joint`: the sources score the samples, then every row along its gold or its
    source's answer (2B rows), and the student's loss is the off-policy step's on the same batch
    plus (1 - lam) times the samples' divergence of the alternate on-policy step. (Three modules
    on the same student: a fresh adapter leaves it its base; every one reads the sources at the
    same boundaries.)"""
    settings = {
        "fusion": "oracle",
        "response_from": "student",
        "on_policy_mix": "joint",
        "divergence": "reverse_kl",
        "lam": 0.3,
        "boundary": "prefix",
    }
    rows, samples = [], {}

    def student_terms(**changes) -> tuple[float, float]:
        module = _module(tiny_zoo, **settings | changes)
        batch = _batch(module)
        if not samples:
            torch.manual_seed(0)
            samples.update(module.sample(batch))
        module.sample = lambda b: {k: v.clone() for k, v in samples.items()}
        run = module.pool.run
        module.pool.run = lambda selected, scored, *a, **kw: rows.append(scored["input_ids"].shape[0]) or run(selected, scored, *a, **kw)
        module.training_step(batch, 0)
        return module.logged["train/loss_student"], module.logged["train/divergence"]

    joint, joint_divergence = student_terms()
    off_policy, _ = student_terms(response_from="source")
    _, divergence = student_terms(on_policy_mix="alternate")
    assert rows == [6, 3, 4]  # joint: 3 samples + 3 answered rows; off-policy: 3 rows; alternate: 3 samples + 1 gold row
    assert divergence > 0 and off_policy > 0
    assert joint_divergence == pytest.approx(divergence, rel=1e-5)
    assert joint == pytest.approx(off_policy + 0.7 * divergence, rel=1e-5)


def test_on_policy_share_of_steps_is_evenly_spread():
    assert [is_on_policy_step(s, 0.5) for s in range(6)] == [False, True, False, True, False, True]
    assert [is_on_policy_step(s, 0.25) for s in range(8)] == [False, False, False, True] * 2
    assert all(is_on_policy_step(s, 1.0) for s in range(5))
    assert not any(is_on_policy_step(s, 0.0) for s in range(5))


def test_only_a_student_response_makes_a_step_on_policy(tiny_zoo):
    on = _module(tiny_zoo, fusion="oracle", response_from="student", on_policy_fraction=0.5)
    assert [on.on_policy(s) for s in range(6)] == [False, True, False, True, False, True]
    assert not any(_module(tiny_zoo, fusion="oracle", on_policy_fraction=0.5).on_policy(s) for s in range(5))


SEEN_COLUMNS: list[dict] = []


def recording_reward(prompts, completions, **columns):
    SEEN_COLUMNS.append({"prompts": list(prompts), "completions": list(completions), **columns})
    return [float(len(c)) for c in completions]


def test_reward_signal_observes_exactly_the_k_selected_and_reads_no_gold(tiny_zoo):
    module = _module(
        tiny_zoo, fusion="selector", top_k=2, selector_signal="rewards", selector_rewards={"tests.test_on_policy.recording_reward": 1.0}
    )
    _prefer(module, [-1.0, -2.0, -5.0])  # spell, then sum, never noise
    calls = []
    for index, model in enumerate(module.pool.models):
        original = model.generate
        model.generate = lambda *a, _i=index, _g=original, **kw: calls.append((_i, kw["input_ids"].shape[0])) or _g(*a, **kw)
    SEEN_COLUMNS.clear()
    module.eval()  # no exploration noise: the selection is [0, 1] on every row
    answered = module.answer_prompts(_batch(module))
    cost, observed, logs = reward_observations(answered, torch.tensor([[0, 1]] * 3), module.pool, module.selector_rewards, module.settings)
    # k = 2 answers per prompt: spell's answers to the two prompts without gold were written by
    # answer_prompts and are reused; spell answers the labelled prompt, sum every prompt.
    assert calls == [(0, 2), (0, 1), (1, 3)] and logs["train/reward_generations"] == 4.0
    assert observed.tolist() == [[True, True, False]] * 3
    texts = {(1, 0): answered["answers"][1]["text"], (2, 0): answered["answers"][2]["text"]}
    assert [-float(cost[b, 0]) for b in (1, 2)] == [float(len(texts[(b, 0)])) for b in (1, 2)]
    assert float(cost[0, 2]) == 0.0
    (columns,) = SEEN_COLUMNS
    assert [-float(c) for c in cost[:, :2].flatten()] == [float(len(c)) for c in columns["completions"]]  # row-major pairs
    assert columns["prompts"] == [ROWS[0]["prompt"]] * 2 + [ROWS[1]["prompt"]] * 2 + [ROWS[2]["prompt"]] * 2
    assert columns["response"] == ["cba", "cba", None, None, None, None] and columns["metadata"] == [None] * 6
    # Through the step: the regression targets are the rewards, on those six pairs.
    module.train()
    module.router.prefitted = True
    SEEN_COLUMNS.clear()
    module.training_step(_batch(module), 0)
    (columns,) = SEEN_COLUMNS
    lengths = [len(c) for c in columns["completions"]]  # the pairs row-major: (0, spell), (0, sum), (1, spell), ...
    assert len(lengths) == 6 and module.logged["reward/tests.test_on_policy.recording_reward"] == pytest.approx(sum(lengths) / 6)
    # The selector predicts u = (-1, -2) for (spell, sum) on every prompt and regresses it onto the rewards: MSE.
    squared = [(u - reward) ** 2 for u, reward in zip([-1.0, -2.0] * 3, lengths)]
    assert module.logged["train/loss_selector"] == pytest.approx(sum(squared) / 6, rel=1e-5)


def test_answer_format_reads_the_prompt_not_the_gold():
    prompts = ["backward dog=", "backward dog=", "sort< cat, ant=", "reverse a, b, c=", "3 + 4=", "3 + 4=", "what?"]
    completions = ["god", "dg", "ant, cat", "c, a", "7", "seven", "anything"]
    domains = ["spell_backward", "spell_backward", "word_sorting", "word_sequence_reversal", "chain_sum", "chain_sum", "other"]
    expected = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert answer_format(prompts, completions, domain=domains) == expected
    # The gold and metadata columns, passed as every reward gets them, change nothing: wrong ones, or none.
    for gold in (["dog", "god", "cat, ant", "a, b, c", "8", "7", "x"], [None] * 7):
        assert answer_format(prompts, completions, domain=domains, response=gold, metadata=[{"answer": g} for g in gold]) == expected
    # It has no gold parameter: a fourth column is not even accepted positionally.
    with pytest.raises(TypeError, match=r"answer_format\(\) takes 3 positional arguments but 4 were given"):
        answer_format(prompts, completions, domains, ["god"] * 7)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"response_from": "teacher"}, r"model.response_from must be one of \('source', 'student'\), got 'teacher'"),
        ({"divergence": "tv"}, r"model.divergence must be one of \('forward_kl', 'reverse_kl', 'jsd'\), got 'tv'"),
        ({"jsd_beta": 1.0}, r"model.jsd_beta must be in \(0, 1\) \(its ends are forward_kl and reverse_kl\), got 1.0"),
        ({"on_policy_fraction": 1.5}, r"model.on_policy_fraction in \[0, 1\], got 1.0, 32 and 1.5"),
        ({"on_policy_mix": "both"}, r"model.on_policy_mix must be one of \('alternate', 'joint'\), got 'both'"),
        ({"sample_temperature": 0.0}, r"model.sample_temperature must be positive.* got 0.0, 32 and 1.0"),
        (
            {"response_from": "student", "source_mode": "cached", "cache_dir": "x"},
            r"model.response_from 'student' runs the sources on what is written during training: it needs model.source_mode 'online'",
        ),
        (
            {"response_from": "student", "fusion": "none"},
            r"needs model.source_mode 'online' and a fusion method with sources, got 'online' and 'none'",
        ),
        (
            {"selector_signal": "rewards", "fusion": "oracle"},
            r"model.selector_signal 'rewards' trains the selector: it needs model.fusion 'selector', got 'oracle'",
        ),
        ({"selector_signal": "ce"}, r"model.selector_signal must be one of \('gold_ce', 'rewards'\), got 'ce'"),
        (
            {"boundary": "prefix", "unaligned": "mask"},
            r"model.boundary must be null or one of \('token_end', 'prefix'\) \('prefix' reads sources "
            r"inside their tokens: it needs model.unaligned 'marginal'\), got 'prefix' with unaligned 'mask'",
        ),
        ({"boundary": "start"}, r"model.boundary must be null or one of .*got 'start' with unaligned 'marginal'"),
        (
            {"selector_signal": "rewards", "selector_rewards": {"fusion.stages.rewards.nothing": 1.0}},
            r"model.selector_rewards\['fusion.stages.rewards.nothing'\]: cannot import reward function",
        ),
    ],
)
def test_bad_on_policy_settings_name_the_key(settings, message):
    with pytest.raises(ValueError, match=message):
        FusionDistillModule(student="checkpoints/zoo/student", sources=["checkpoints/zoo/chain_sum-gpt2"], **{"top_k": 1, **settings})


# ------------------------------------------------------------------ a second stage from a fusion checkpoint


def test_init_from_restores_the_adapter_and_the_selector(tiny_zoo, tmp_path):
    """On-policy fusion after off-policy fusion: `init_from` gives the student the earlier run's
    adapter and the selector its weights, fitted already (no exploration, no second prefit)."""
    student = os.path.join(tiny_zoo, "student")
    sources = [os.path.join(tiny_zoo, name) for name in ("spell", "sum", "noise")]
    torch.manual_seed(1)
    first = FusionDistillModule(student=student, sources=sources, fusion="selector", top_k=1)
    with torch.no_grad():
        for name, p in first.named_parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.3)
    path = str(tmp_path / "off_policy.ckpt")
    torch.save({"state_dict": first.trainable_state_dict(), "hyper_parameters": dict(first.hparams)}, path)

    second = FusionDistillModule(student=student, sources=sources, fusion="selector", top_k=1, init_from=path, response_from="student")
    fresh = FusionDistillModule(student=student, sources=sources, fusion="selector", top_k=1)
    ids, features = torch.tensor([[1, 40, 41, 42, 33, 20]]), torch.randn(3, first.student.config.hidden_size)
    with torch.no_grad():
        expected, got, base = (m.student(input_ids=ids).logits for m in (first, second, fresh))
        assert torch.equal(second.selector(features), first.selector(features))
        assert not torch.equal(fresh.selector(features), first.selector(features))
    assert torch.equal(got, expected) and (got - base).abs().max() > 1e-2
    second.train()
    assert second.router.prefitted and not second.explores  # routes with the loaded selector from the first step
    for key, value in first.trainable_state_dict().items():
        assert torch.equal(second.trainable_state_dict()[key], value), key

    # A selector scores sources by position: another source list is refused, naming both.
    with pytest.raises(
        ValueError,
        match=r"model.init_from: the selector in .* scores the sources \['spell', 'sum', 'noise'\], model.sources are \['sum', 'spell', 'noise'\]",
    ):
        FusionDistillModule(student=student, sources=[sources[1], sources[0], sources[2]], fusion="selector", top_k=1, init_from=path)
    # A method without a selector takes the adapter alone.
    oracle = FusionDistillModule(student=student, sources=sources, fusion="oracle", oracle={"spell_backward": "spell"}, init_from=path)
    with torch.no_grad():
        assert torch.equal(oracle.student(input_ids=ids).logits, expected)


def test_boundary_null_reads_from_the_prefix_along_the_students_own_samples(tiny_zoo):
    """`model.boundary: null` is "prefix" where the student's next token is its own sample (with the
    marginal policy, which it needs) and "token_end" elsewhere; the pool and the cache fingerprint
    follow it."""
    student, sources = os.path.join(tiny_zoo, "student"), [os.path.join(tiny_zoo, "sum")]
    cases = [
        ({}, "token_end"),
        ({"response_from": "student"}, "prefix"),
        ({"response_from": "student", "unaligned": "mask"}, "token_end"),
        ({"response_from": "student", "boundary": "token_end"}, "token_end"),
        ({"boundary": "prefix"}, "prefix"),
    ]
    for settings, expected in cases:
        module = FusionDistillModule(student=student, sources=sources, fusion="uniform", **settings)
        assert module.settings.resolved_boundary == expected, settings
        assert module.pool.boundary == expected, settings
        read = {"top_k": 10, "temperature": 1.0, "unaligned": settings.get("unaligned", "marginal"), "vocab_map": "exact+med"}
        assert module.settings.source_output_settings() == read | ({"boundary": "prefix"} if expected == "prefix" else {}), settings
