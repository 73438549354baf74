"""The SRFT stage: every formula on hand-made rollouts, reward-function errors, starting from a
fusion checkpoint, and one fit + test through the CLI on the tiny zoo.

Expected numbers are literals or math expressions a reader can check with pencil and paper.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import warnings

import pytest
import torch
import yaml

from fusion.data import IGNORE_INDEX
from fusion.data.datamodule import collate, encode
from fusion.objectives import srft_losses as S
from fusion.stages.fusion import FusionDistillModule
from fusion.stages.rewards import Rewards, task_correct, task_score, verified_or_agreement
from fusion.stages.srft import SRFTModule
from fusion.stages.student import pack_rollouts
from fusion.train import main
from tests.conftest import DOMAINS, reference_test_metrics, tiny_config


def approx(value, expected, abs: float = 1e-6) -> bool:
    value = torch.as_tensor(value.detach() if isinstance(value, torch.Tensor) else value, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    return value.shape == expected.shape and bool(torch.allclose(value, expected, rtol=0.0, atol=abs))


# ---------------------------------------------------------------------------------------------
# advantage, entropy, weights, each loss term
# ---------------------------------------------------------------------------------------------


def test_equal_rewards_give_zero_advantage():
    assert approx(S.group_advantages(torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])), [[0.0] * 4] * 2)


def test_correct_demo_among_wrong_rollouts_gets_a_positive_advantage():
    # Augmented group [0, 0, 0 | 1]: mean 1/4, sample std sqrt((3/16 + 9/16) / 3) = 1/2.
    advantage = S.group_advantages(torch.tensor([[0.0, 0.0, 0.0, 1.0]]), eps=0.0)
    assert approx(advantage, [[-0.5, -0.5, -0.5, 1.5]])
    terms = S.srft_loss(*_rollouts(rewards=[[0.0, 0.0, 0.0]], demo_rewards=[1.0]), eps=0.0)
    assert approx(terms["demo_advantage"], [1.5]) and approx(terms["advantage"], [[-0.5, -0.5, -0.5]])


def test_token_entropy_hand_values():
    uniform = torch.zeros(1, 1, 4)  # H = log 4
    certain = torch.tensor([[[0.0, -1e4, -1e4, -1e4]]])  # H = 0
    logp = torch.log_softmax(torch.cat([uniform, certain], 1), -1)
    assert approx(S.token_entropy(logp), [[math.log(4), 0.0]], abs=1e-5)
    # p = (1/2, 1/4, 1/4): H = 1/2 log 2 + 2 * 1/4 log 4 = 1.5 log 2
    assert approx(S.token_entropy(torch.log(torch.tensor([0.5, 0.25, 0.25]))), 1.5 * math.log(2))


def test_token_statistics_entropy_and_kl_by_hand():
    """One trained position at T = 2: logits (0, 2 log 3) give pi = (1/4, 3/4); against the
    reference logits (0, 0), pi_ref = (1/2, 1/2). Untrained positions hold 0."""
    logits = torch.tensor([[[0.0, 2 * math.log(3)], [5.0, -5.0]]], requires_grad=True)
    targets = torch.tensor([[1, IGNORE_INDEX]])
    out = S.token_statistics(logits, targets, temperature=2.0, reference_logits=torch.zeros(1, 2, 2))
    entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert approx(out["logp"], [[math.log(0.75), 0.0]]) and approx(out["entropy"], [[entropy, 0.0]])
    assert approx(out["kl"], [[kl, 0.0]])
    assert not out["entropy"].requires_grad and out["kl"].requires_grad


def test_entropy_granularity():
    # B=1, G=2, T=2; rollout 0 has entropies [1, 3], rollout 1 has [2, (masked) 9].
    rollout_h = torch.tensor([[[1.0, 3.0], [2.0, 9.0]]])
    mask = torch.tensor([[[1, 1], [1, 0]]])
    demo_h = torch.tensor([[0.5, 0.7]])
    demo, rollout = S.entropy_levels(demo_h, rollout_h, mask, "token")
    assert approx(demo, [[0.5, 0.7]]) and approx(rollout, rollout_h)
    demo, rollout = S.entropy_levels(demo_h, rollout_h, mask, "sequence")
    assert approx(rollout, [[[2.0, 2.0], [2.0, 2.0]]])  # each rollout's own mean: (1 + 3) / 2 and 2
    assert approx(demo, [[2.0, 2.0]])  # the prompt's rollout tokens: (1 + 3 + 2) / 3
    rollout_h[0, 1, 0] = 5.0
    demo, rollout = S.entropy_levels(demo_h, rollout_h, mask, "batch")
    assert approx(demo, [[3.0, 3.0]]) and approx(rollout, [[[3.0, 3.0], [3.0, 3.0]]])  # (1 + 3 + 5) / 3
    with pytest.raises(ValueError, match="model.entropy_granularity must be one of"):
        S.entropy_levels(demo_h, rollout_h, mask, "word")


@pytest.mark.parametrize("sign", [-1, 1])
def test_sft_weight_moves_with_entropy_in_the_configured_direction(sign):
    low, high = S.sft_weight(torch.tensor(0.2), 0.5, sign), S.sft_weight(torch.tensor(1.0), 0.5, sign)
    assert approx(high, 0.5 * math.exp(sign * 1.0)) and approx(low, 0.5 * math.exp(sign * 0.2))
    assert (high < low) if sign == -1 else (high > low)
    # Through the whole loss: a more uncertain policy changes w_SFT the same way.
    calm = S.srft_loss(*_rollouts(entropy=0.2), sft_sign=sign)
    unsure = S.srft_loss(*_rollouts(entropy=1.0), sft_sign=sign)
    assert approx(calm["w_sft"], 0.5 * math.exp(sign * 0.2)) and approx(unsure["w_sft"], 0.5 * math.exp(sign * 1.0))
    assert approx(unsure["w_rl"], 0.1 * math.exp(1.0)) and unsure["w_rl"] > calm["w_rl"]  # w_RL grows with H either way


def test_rl_weight_on_positive_advantages_only():
    c = S.rl_weight(torch.tensor([0.5, 0.5, 2.0]), torch.tensor([1.0, -1.0, 0.0]), 0.1)
    assert approx(c, [0.1 * math.exp(0.5), 1.0, 1.0])


def test_constant_weights_ignore_entropy():
    terms = S.srft_loss(*_rollouts(entropy=1.7), weights="constant")
    assert approx(terms["w_sft"], 0.5) and approx(terms["w_rl"], 0.1)
    assert approx(terms["entropy"], 1.7, abs=1e-6)  # still measured and logged


def test_luffy_shaping_values_and_gradient():
    p = torch.tensor([0.0, 0.1, 0.9, 1.0])
    assert approx(S.luffy_shaping(p), [0.0, 0.5, 0.9, 1.0 / 1.1])
    # The demo RL term's gradient on log p(y*) is -A f'(p) p = -A * 0.1 p / (p + 0.1)^2: 0.09 at p = 0.9.
    logp = torch.tensor([[math.log(0.9)]], requires_grad=True)
    S.rl_demo_loss(logp, torch.ones(1, 1), torch.tensor([2.0])).backward()
    assert approx(logp.grad, [[-2.0 * 0.1 * 0.9 / 1.0**2]])


def test_each_loss_term_hand_values():
    # Demo: log p = [log 1/2, log 1/4, (masked)]; w_SFT = 0.5 on every token.
    demo_logp = torch.tensor([[math.log(0.5), math.log(0.25), -9.0]])
    demo_mask = torch.tensor([[1, 1, 0]])
    assert approx(S.sft_demo_loss(demo_logp, demo_mask, torch.full((1, 3), 0.5)), 0.5 * (math.log(2) + math.log(4)) / 2)
    assert approx(S.rl_demo_loss(demo_logp, demo_mask, torch.tensor([1.5])), -1.5 * (0.5 / 0.6 + 0.25 / 0.35) / 2)
    # Rollouts: two of one prompt, A = [1, -1], c = [0.2, 1] on every token.
    rollout_logp = torch.tensor([[[math.log(0.5), math.log(0.5)], [math.log(0.25), 0.0]]])
    rollout_mask = torch.tensor([[[1, 1], [1, 0]]])
    c = torch.tensor([[[0.2, 0.2], [1.0, 1.0]]])
    expected = -(1.0 * 0.2 * math.log(0.5) + (-1.0) * 1.0 * math.log(0.25)) / 2
    assert approx(S.rl_self_loss(rollout_logp, rollout_mask, torch.tensor([[1.0, -1.0]]), c), expected)
    # KL(pi || ref): 0 for equal distributions; hand value for [1/2, 1/2] against [1/4, 3/4].
    pi = torch.log(torch.tensor([[[0.5, 0.5]]]))
    ref = torch.log(torch.tensor([[[0.25, 0.75]]]))
    assert approx(S.kl_to_reference(pi, pi), [[0.0]])
    assert approx(S.kl_to_reference(pi, ref), [[0.5 * math.log(2) + 0.5 * math.log(2 / 3)]])


def test_srft_sums_the_three_terms_and_the_modes_drop_the_right_ones():
    inputs = _rollouts(rewards=[[1.0, 0.0]], demo_rewards=[1.0])
    srft = S.srft_loss(*inputs)
    assert all(abs(float(srft[k])) > 1e-4 for k in ("sft_demo", "rl_demo", "rl_self"))
    assert approx(srft["loss"], srft["sft_demo"] + srft["rl_demo"] + srft["rl_self"])
    sft_only = S.srft_loss(*inputs, mode="sft_only")
    assert approx(sft_only["loss"], srft["sft_demo"]) and float(sft_only["rl_demo"]) == float(sft_only["rl_self"]) == 0.0
    rl_only = S.srft_loss(*inputs, mode="rl_only")
    assert float(rl_only["sft_demo"]) == float(rl_only["rl_demo"]) == 0.0
    # GRPO: the group is the two rollouts alone, A = +-1/sqrt(2) (not the augmented [1, 0, 1]).
    assert approx(rl_only["advantage"], [[1 / math.sqrt(2), -1 / math.sqrt(2)]], abs=1e-5)
    assert approx(srft["advantage"], [[1 / math.sqrt(3), -2 / math.sqrt(3)]], abs=1e-5)
    assert approx(rl_only["loss"], rl_only["rl_self"])
    assert approx(rl_only["zero_std_groups"], 0.0)
    with pytest.raises(ValueError, match="model.mode must be one of"):
        S.srft_loss(*inputs, mode="dpo")


def test_equal_rewards_leave_only_the_sft_term():
    terms = S.srft_loss(*_rollouts(rewards=[[1.0, 1.0]], demo_rewards=[1.0]))
    assert float(terms["rl_demo"]) == 0.0 and float(terms["rl_self"]) == 0.0
    assert approx(terms["loss"], terms["sft_demo"]) and approx(terms["zero_std_groups"], 1.0)


def test_a_prompt_without_a_demo_token_has_no_demo_terms_and_its_rollouts_train_alone():
    """Two prompts with rollout rewards [1, 0]; the second's demo is empty (mask 0). Prompt 0: the
    augmented group [1, 0 | 1], A = [1/sqrt 3, -2/sqrt 3], A* = 1/sqrt 3. Prompt 1: its rollouts
    alone, A = [1/sqrt 2, -1/sqrt 2], A* = 0; the demo means are over prompt 0 only."""
    one = _rollouts(rewards=[[1.0, 0.0]], demo_rewards=[1.0])
    demo_logp, demo_mask, demo_h, rollout_logp, rollout_mask, rollout_h, _, _ = one
    two = (
        demo_logp.repeat(2, 1),
        torch.tensor([[1.0, 1.0], [0.0, 0.0]]),
        demo_h.repeat(2, 1),
        rollout_logp.repeat(2, 1, 1),
        rollout_mask.repeat(2, 1, 1),
        rollout_h.repeat(2, 1, 1),
        torch.tensor([[1.0, 0.0], [1.0, 0.0]]),
        torch.tensor([1.0, 0.0]),
    )
    terms, alone = S.srft_loss(*two, eps=0.0), S.srft_loss(*one, eps=0.0)
    assert approx(terms["advantage"], [[1 / math.sqrt(3), -2 / math.sqrt(3)], [1 / math.sqrt(2), -1 / math.sqrt(2)]], abs=1e-5)
    assert approx(terms["demo_advantage"], [1 / math.sqrt(3), 0.0], abs=1e-5)
    assert approx(terms["sft_demo"], alone["sft_demo"]) and approx(terms["rl_demo"], alone["rl_demo"])
    assert approx(terms["zero_std_groups"], 0.0)


def _rollouts(rewards=((1.0, 0.0),), demo_rewards=(1.0,), entropy: float = 0.5):
    """One prompt, G rollouts of two tokens each, a two-token demo; fixed log-probs, constant entropy."""
    rewards = torch.tensor(rewards)
    group = rewards.shape[1]
    demo_logp = torch.log(torch.tensor([[0.5, 0.8]]))
    rollout_logp = torch.log(torch.tensor([[[0.6, 0.3]] * group]))
    return (
        demo_logp,
        torch.ones(1, 2),
        torch.full((1, 2), entropy),
        rollout_logp,
        torch.ones(1, group, 2),
        torch.full((1, group, 2), entropy),
        rewards,
        torch.tensor(demo_rewards),
    )


# ---------------------------------------------------------------------------------------------
# rollouts and rewards
# ---------------------------------------------------------------------------------------------


def test_pack_rollouts_right_pads_and_trains_on_the_completion_up_to_eos():
    pad, eos = 0, 2
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])  # left-padded prompts [7, 8] and [5, 6, 7]
    generated = torch.tensor([[pad, 7, 8, 11, eos, 13], [5, 6, 7, 12, 14, 15]])  # row 0 ends at eos; row 1 has no eos
    packed = pack_rollouts(prompt_mask, generated, eos, pad)
    assert packed["input_ids"].tolist() == [[7, 8, 11, eos, pad, pad], [5, 6, 7, 12, 14, 15]]
    assert packed["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    ig = IGNORE_INDEX
    assert packed["targets"].tolist() == [[ig, 11, eos, ig, ig, ig], [ig, ig, 12, 14, 15, ig]]
    assert packed["length"].tolist() == [2, 3]
    assert packed["completion"].tolist() == [[11, pad, pad], [12, 14, 15]]  # eos and after blanked for decoding


def raising_reward(prompts, completions, **columns):
    raise KeyError("gold")


def short_reward(prompts, completions, **columns):
    return [1.0] * (len(completions) - 1)


def length_reward(prompts, completions, **columns):
    return [float(len(c)) for c in completions]


def test_rewards_are_weighted_and_checked():
    rows = {"response": ["cba", "7"], "domain": ["spell_backward", "chain_sum"], "metadata": [None, None]}
    rewards = Rewards({"fusion.stages.rewards.exact_match": 1.0, "tests.test_srft.length_reward": 0.5})
    total, means = rewards(["backward abc=", "3+4="], ["cba", "8"], rows)
    assert total.tolist() == [1.0 + 0.5 * 3, 0.0 + 0.5 * 1]
    assert means == {"fusion.stages.rewards.exact_match": 0.5, "tests.test_srft.length_reward": 2.0, "errors": 0.0}
    with pytest.raises(ValueError, match=r"reward function 'tests.test_srft.short_reward' returned 1 values for 2 completions"):
        Rewards({"tests.test_srft.short_reward": 1.0})(["p", "q"], ["c", "d"], {"response": ["r", "s"]})
    with pytest.raises(ValueError, match=r"model.rewards\['tests.test_srft.no_such_reward'\]: cannot import reward function"):
        Rewards({"tests.test_srft.no_such_reward": 1.0})
    with pytest.raises(ValueError, match=r"model.rewards is empty"):
        Rewards({})


def picky_verifier(prompts, completions, response, **columns):
    """1 where the completion equals gold; raises on a completion that is not a number (malformed)."""
    return [float(int(completion) == int(gold)) for completion, gold in zip(completions, response)]


def test_a_raising_verifier_scores_that_rollout_0_counts_it_and_warns_once():
    rewards = Rewards({"tests.test_srft.picky_verifier": 1.0, "tests.test_srft.length_reward": 0.5})
    columns = {"response": ["7", "7", "8"], "domain": ["chain_sum"] * 3, "metadata": [None] * 3}
    with pytest.warns(UserWarning, match=r"reward function 'tests.test_srft.picky_verifier' raised ValueError: .* on 1 of 3 completions"):
        total, means = rewards(["3+4="] * 2 + ["4+4="], ["7", "7?", "8"], columns)
    # The malformed "7?" scores 0 from the verifier; the other rollouts, and the other function, as ever.
    assert total.tolist() == [1.0 + 0.5 * 1, 0.0 + 0.5 * 2, 1.0 + 0.5 * 1]
    assert means == {
        "tests.test_srft.picky_verifier": pytest.approx(2 / 3),
        "tests.test_srft.length_reward": pytest.approx(4 / 3),
        "errors": 1.0,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: a second malformed rollout is counted, not warned about
        total, means = rewards(["3+4="], ["x"], {key: column[:1] for key, column in columns.items()})
    assert total.tolist() == [0.0 + 0.5 * 1] and means["errors"] == 1.0
    # Two raising functions on one rollout: two errors. A wrong return value is still an error that stops the step.
    total, means = Rewards({"tests.test_srft.raising_reward": 1.0, "tests.test_srft.picky_verifier": 2.0})(
        ["p"], ["c"], {"response": ["1"]}
    )
    assert total.tolist() == [0.0] and means["errors"] == 2.0


def test_a_reward_that_needs_gold_is_refused_on_prompts_without_it_before_any_rollout(tiny_student, monkeypatch):
    from fusion.stages.fusion_settings import FusionSettings
    from fusion.stages.rewards import answer_format, exact_match, reads_gold

    assert [reads_gold(f) for f in (task_score, task_correct, exact_match, answer_format, length_reward)] == [True] * 3 + [False] * 2
    # SRFT: checked at the start of the step, before the student samples anything.
    module = SRFTModule(student=tiny_student, num_generations=2, max_new_tokens=3)
    _logged(module)
    generated = []
    monkeypatch.setattr(module.student, "generate", lambda *a, **kw: generated.append(1) or pytest.fail("generated a rollout"))
    batch = _module_batch(module)
    batch["rows"][1] = {"prompt": "3+4=", "response": None, "domain": "chain_sum", "metadata": None}
    message = (
        r"model.rewards\['fusion.stages.rewards.task_correct'\] compares answers with the gold one \(it reads response or metadata\), "
        r"and the batch has 1 prompt\(s\) without gold: use a reward function that reads no gold"
    )
    with pytest.raises(ValueError, match=message):
        module.training_step(batch, 0)
    assert generated == []
    # The fusion stage's selector rewards: checked with the corpus's prompts without gold, at setup.
    rows = [{"prompt": "3+4=", "response": None, "domain": "chain_sum", "metadata": None}] * 2
    settings = {"sources": ["zoo/spell", "zoo/sum"], "top_k": 1, "selector_signal": "rewards"}
    with pytest.raises(
        ValueError, match=r"model.selector_rewards\['fusion.stages.rewards.exact_match'\] .* the fusion corpus .* has 2 prompt"
    ):
        FusionSettings(**settings, selector_rewards={"fusion.stages.rewards.exact_match": 1.0}).check_unlabeled(rows)
    FusionSettings(**settings).check_unlabeled(rows)  # the default, answer_format, reads no gold
    # Called directly on a batch without gold, a gold reader is refused and a label-free function scores.
    with pytest.raises(ValueError, match=r"model.rewards\['fusion.stages.rewards.exact_match'\] .* this batch has 1 prompt"):
        Rewards({"fusion.stages.rewards.exact_match": 1.0})(["3+4="], ["7"], {"response": [None]})
    assert Rewards({"tests.test_srft.length_reward": 1.0})(["3+4="], ["7"], {"response": [None]})[0].tolist() == [1.0]


def test_task_rewards_use_the_reasoning_gym_scorer():
    columns = {"domain": ["spell_backward"] * 3, "response": ["time"] * 3, "metadata": [None] * 3}
    assert task_score(["backward emit="] * 3, ["time", "tim", "x"], **columns) == [1.0, 0.75, 0.0]  # partial credit
    assert task_correct(["backward emit="] * 3, ["time", "tim", "x"], **columns) == [1.0, 0.0, 0.0]


# ---------------------------------------------------------------------------------------------
# the module on the tiny zoo
# ---------------------------------------------------------------------------------------------


def _fusion_checkpoint(zoo: str, path: str, rank: int = 16) -> FusionDistillModule:
    """A fusion checkpoint with a non-trivial adapter, as Lightning writes it (trainable keys only)."""
    torch.manual_seed(1)
    module = FusionDistillModule(
        student=os.path.join(zoo, "student"), fusion="none", lora={"r": rank, "lora_alpha": 2 * rank, "target_modules": "all-linear"}
    )
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.3)
    torch.save({"state_dict": module.trainable_state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return module


def _ids() -> torch.Tensor:
    return torch.tensor([[1, 40, 41, 42, 33, 20]])


def test_init_from_a_fusion_checkpoint_restores_the_adapter(tiny_zoo, tmp_path):
    fused = _fusion_checkpoint(tiny_zoo, str(tmp_path / "fused.ckpt"))
    module = SRFTModule(student=os.path.join(tiny_zoo, "student"), init_from=str(tmp_path / "fused.ckpt"))
    fresh = SRFTModule(student=os.path.join(tiny_zoo, "student"))
    with torch.no_grad():
        expected, got, base = (m.student(input_ids=_ids()).logits for m in (fused, module, fresh))
    assert torch.allclose(got, expected, atol=1e-5)
    assert (got - base).abs().max() > 1e-2  # the adapter is not the identity
    # A glob picks the newest match; an adapter of another rank is refused, naming the key.
    assert SRFTModule(student=os.path.join(tiny_zoo, "student"), init_from=str(tmp_path / "*.ckpt")).init_path == str(
        tmp_path / "fused.ckpt"
    )
    _fusion_checkpoint(tiny_zoo, str(tmp_path / "rank4.ckpt"), rank=4)
    with pytest.raises(
        ValueError, match=r"model.init_from: the adapter in .*rank4.ckpt' does not fit model.student and model.lora .*lora=\{'r': 4"
    ):
        SRFTModule(student=os.path.join(tiny_zoo, "student"), init_from=str(tmp_path / "rank4.ckpt"))
    with pytest.raises(FileNotFoundError, match=r"model.init_from: nothing matches"):
        SRFTModule(student=os.path.join(tiny_zoo, "student"), init_from=str(tmp_path / "none-*.ckpt"))


def test_init_from_an_exported_directory(tiny_zoo, tmp_path):
    from fusion import export

    fused = _fusion_checkpoint(tiny_zoo, str(tmp_path / "fused.ckpt"))
    directory = export.export(str(tmp_path / "fused.ckpt"), str(tmp_path / "exported"))
    module = SRFTModule(student=os.path.join(tiny_zoo, "student"), init_from=directory, kl_weight=0.1)
    with torch.no_grad():
        expected, got, reference = (
            fused.student(input_ids=_ids()).logits,
            module.student(input_ids=_ids()).logits,
            module.reference_logits(_ids()),
        )
    assert torch.allclose(got, expected, atol=1e-4) and torch.allclose(reference, expected, atol=1e-4)
    assert module.base_model == directory
    assert not any("reference" in k for k in module.trainable_state_dict())  # the frozen reference is never saved


def _parameter_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("start", ["fresh", "checkpoint", "exported"])
def test_kl_reference_is_the_starting_policy_held_by_adapter_switching(tiny_zoo, tmp_path, start):
    """The KL term's reference is the starting student, read off the student itself (its adapter
    disabled, or a frozen second adapter holding a checkpoint's starting adapter): equal logits
    before training, unchanged by an optimizer step on the trained adapter, no second model."""
    from fusion import export

    student = os.path.join(tiny_zoo, "student")
    init_from = None
    if start != "fresh":
        _fusion_checkpoint(tiny_zoo, str(tmp_path / "fused.ckpt"))
        init_from = str(tmp_path / "fused.ckpt")
        if start == "exported":
            init_from = export.export(init_from, str(tmp_path / "exported"))
    plain = SRFTModule(student=student, init_from=init_from)
    module = SRFTModule(student=student, init_from=init_from, kl_weight=0.1, num_generations=2, max_new_tokens=4)
    assert module.reference == ("reference" if start == "checkpoint" else "base")

    def trained(m) -> dict[str, torch.Tensor]:
        return {name: p for name, p in m.named_parameters() if p.requires_grad}

    # The trainable weights (and so the checkpoint keys) are the default adapter's, as without KL.
    names = sorted(trained(module))
    assert names == sorted(trained(plain)) == sorted(module.trainable_state_dict()) == sorted(plain.trainable_state_dict())
    assert names and all(".default." in name for name in names)
    # No second model: a fresh adapter adds nothing, a checkpoint's adds one adapter's worth.
    adapter = sum(p.numel() for p in trained(plain).values())
    extra = _parameter_count(module) - _parameter_count(plain)
    assert extra == (adapter if start == "checkpoint" else 0)
    base = [sum(p.numel() for name, p in m.named_parameters() if "lora_" not in name) for m in (module, plain)]
    assert base[0] == base[1] == _parameter_count(plain) - adapter  # one copy of the base weights, not two

    ids = torch.tensor([[1, 40, 41, 42, 33, 20], [1, 33, 34, 20, 40, 41]])
    with torch.no_grad():
        start_logits = module.student(input_ids=ids).logits
    module.student.train()
    reference = module.reference_logits(ids)
    assert torch.equal(reference, start_logits) if start != "checkpoint" else torch.allclose(reference, start_logits, atol=1e-6)
    assert module.student.training and sorted(trained(module)) == names  # mode and trainable set restored

    # One optimizer step (a training step with the KL term on) over the trainable weights.
    optimizer = torch.optim.AdamW(list(trained(module).values()), lr=1e-2)
    _logged(module)
    torch.manual_seed(0)
    loss = module.training_step(_module_batch(module), 0)
    loss.backward()
    optimizer.step()
    assert sorted(trained(module)) == names and sorted(module.trainable_state_dict()) == names
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {id(p) for p in trained(module).values()}
    with torch.no_grad():
        after = module.student(input_ids=ids).logits
    assert (after - start_logits).abs().max() > 1e-3  # the student moved
    assert torch.equal(module.reference_logits(ids), reference)  # its reference did not


def _module_batch(module: SRFTModule) -> dict:
    rows = [
        {"prompt": "backward abc=", "response": "cba", "domain": "spell_backward", "metadata": None},
        {"prompt": "3+4=", "response": "7", "domain": "chain_sum", "metadata": None},
    ]
    return collate([encode(module.tokenizer, r["prompt"], r["response"], 32) | {"row": r} for r in rows], module.tokenizer.pad_token_id)


def _logged(module: SRFTModule) -> dict:
    logged = {}
    module.log_dict = lambda values, **kw: logged.update({k: float(v) for k, v in values.items()})
    module.log = lambda *a, **kw: None
    return logged


def test_training_step_sft_only_is_the_demo_ce(tiny_zoo):
    """sft_only with constant weights: the loss is 0.5 times the demos' per-sequence CE, averaged."""
    from fusion.objectives.losses import target_logprobs

    torch.manual_seed(0)
    module = SRFTModule(student=os.path.join(tiny_zoo, "student"), mode="sft_only", weights="constant", num_generations=3, max_new_tokens=5)
    logged = _logged(module)
    batch = _module_batch(module)
    rollouts = {}
    sample = module.sample
    module.sample = lambda b: rollouts.update(sample(b)) or rollouts
    loss = module.training_step(batch, 0)
    with torch.no_grad():
        logits = module.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        rollout_logits = module.student(input_ids=rollouts["input_ids"], attention_mask=rollouts["attention_mask"]).logits
    trained = (batch["targets"] != IGNORE_INDEX).float()
    per_sequence = -(target_logprobs(logits, batch["targets"]) * trained).sum(-1) / trained.sum(-1)  # each demo's token-mean CE
    expected = 0.5 * per_sequence.mean()
    assert approx(loss, expected, abs=1e-5)
    # The logs are the rollouts' numbers: 2 prompts x 3 rollouts, their lengths, their token entropy.
    lengths = rollouts["length"].float()
    assert lengths.shape == (6,) and logged["train/response_length"] == pytest.approx(float(lengths.mean()))
    assert logged["train/generated_tokens"] == float(lengths.sum())
    rollout_mask = rollouts["targets"] != IGNORE_INDEX
    entropy = S.token_statistics(rollout_logits, rollouts["targets"])["entropy"]
    assert logged["train/entropy"] == pytest.approx(float(entropy[rollout_mask].mean()), abs=1e-5)
    assert logged["train/w_sft"] == pytest.approx(0.5) and logged["train/w_rl"] == pytest.approx(0.1)  # constant weights: H = 0
    completions = module.tokenizer.batch_decode(rollouts["completion"], skip_special_tokens=True)
    rows = [row for row in batch["rows"] for _ in range(3)]
    rewards = task_correct(
        [r["prompt"] for r in rows],
        completions,
        domain=[r["domain"] for r in rows],
        response=[r["response"] for r in rows],
        metadata=[r["metadata"] for r in rows],
    )
    assert logged["train/reward_mean"] == pytest.approx(sum(rewards) / 6)
    assert logged["train/demo_reward"] == 1.0  # the gold answers, scored by the task scorer


def test_training_step_with_equal_rewards_has_no_rl_gradient(tiny_zoo):
    """rl_only with a reward that never varies: zero advantage, zero loss, zero gradient."""
    module = SRFTModule(
        student=os.path.join(tiny_zoo, "student"),
        mode="rl_only",
        rewards={"tests.test_srft.constant_reward": 1.0},
        num_generations=2,
        max_new_tokens=4,
    )
    _logged(module)
    loss = module.training_step(_module_batch(module), 0)
    loss.backward()
    assert float(loss) == 0.0
    assert all(p.grad is None or float(p.grad.abs().max()) == 0.0 for p in module.parameters() if p.requires_grad)


def constant_reward(prompts, completions, **columns):
    return [0.25] * len(completions)


def test_a_failing_reward_function_stops_the_step(tiny_zoo):
    module = SRFTModule(
        student=os.path.join(tiny_zoo, "student"), rewards={"tests.test_srft.short_reward": 1.0}, num_generations=2, max_new_tokens=3
    )
    _logged(module)
    with pytest.raises(ValueError, match=r"reward function 'tests.test_srft.short_reward' returned 5 values for 6 completions"):
        module.training_step(_module_batch(module), 0)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"mode": "ppo"}, "model.mode must be one of"),
        ({"weights": "linear"}, "model.weights must be one of"),
        ({"entropy_granularity": "word"}, "model.entropy_granularity must be one of"),
        ({"sft_sign": 2}, "model.sft_sign must be -1"),
        ({"mode": "rl_only", "num_generations": 1}, "model.num_generations must be at least 2 with mode 'rl_only'"),
        ({"shaping": 0.0}, "model.shaping must be positive"),
        ({"rewards": {"nodots": 1.0}}, r"model.rewards\['nodots'\]: 'nodots' is not a dotted path"),
    ],
)
def test_bad_settings_fail_early(settings, message):
    """Refused before the student loads: its path need not exist."""
    with pytest.raises(ValueError, match=message):
        SRFTModule(student="checkpoints/no-zoo/student", **settings)


# ---------------------------------------------------------------------------------------------
# prompts without gold: the routed source's cached answer as the demonstration
# ---------------------------------------------------------------------------------------------


def test_verified_or_agreement_verifies_gold_and_agrees_with_the_routed_source_elsewhere():
    from fusion.stages.rewards import reads_gold

    prompts = ["3+4=", "3+4=", "backward abc=", "backward abc=", "backward dog="]
    columns = {
        "domain": ["chain_sum"] * 2 + ["spell_backward"] * 3,
        "response": ["7", "7", None, None, None],
        "metadata": [None] * 5,
        "demonstration": ["7", "7", "cba", "cba", ""],  # the gold, then the routed source's answers
    }
    completions = ["7", "8", " cba\n", "abc", ""]
    assert verified_or_agreement(prompts[:4], completions[:4], **{k: v[:4] for k, v in columns.items()}) == [1.0, 0.0, 1.0, 0.0]
    assert verified_or_agreement(prompts[4:], completions[4:], **{k: v[4:] for k, v in columns.items()}) == [
        0.0
    ]  # an empty answer: nothing to agree with
    # Accepted on prompts without gold; task_correct still refused there.
    assert not reads_gold(verified_or_agreement) and reads_gold(task_correct)
    rows = [{"prompt": p, "response": r, "domain": d} for p, r, d in zip(prompts, columns["response"], columns["domain"])]
    rewards = Rewards({"fusion.stages.rewards.verified_or_agreement": 1.0})
    rewards.check_gold(rows, "the batch")
    assert rewards(prompts[:4], completions[:4], {k: v[:4] for k, v in columns.items()})[0].tolist() == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(
        ValueError, match=r"model.rewards\['fusion.stages.rewards.task_correct'\] .* the batch has 3 prompt\(s\) without gold"
    ):
        Rewards({"fusion.stages.rewards.task_correct": 1.0}).check_gold(rows, "the batch")


def test_checked_or_agreement_checks_chain_sum_without_gold_and_agrees_elsewhere():
    from fusion.data import tasks
    from fusion.stages.rewards import checked_or_agreement, reads_gold

    # The calculator agrees with the generator on every prompt, in and out of distribution.
    rows = tasks.generate("chain_sum", 300, 11) + tasks.generate("chain_sum", 100, 12, harder=True)
    assert all(tasks.check("chain_sum", r["prompt"], r["response"]) for r in rows)
    assert not any(tasks.check("chain_sum", r["prompt"], str(int(r["response"]) - 1)) for r in rows)
    assert tasks.check("word_sorting", "sort< cat, dog=", "cat, dog") is None  # no checker: only the sources know
    prompts = ["15 - 43=", "15 - 43=", "15 - 43=", "backward abc=", "backward abc="]
    columns = {
        "domain": ["chain_sum"] * 3 + ["spell_backward"] * 2,
        "response": ["-28", None, None, None, None],
        "metadata": [None] * 5,
        "demonstration": ["-28", "-27", "-27", "cba", "cba"],  # the routed source is wrong on the chain_sum prompt
    }
    completions = ["-28", "-28", "-27", "cba", "abc"]
    # Gold verifies; without gold the calculator overrules the wrong routed answer; agreement elsewhere.
    assert checked_or_agreement(prompts, completions, **columns) == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert not reads_gold(checked_or_agreement)
    # A prompt the calculator cannot read is a malformed row: reward 0 and counted, not a crash.
    rewards, means = Rewards({"fusion.stages.rewards.checked_or_agreement": 1.0})(
        ["15 - 43=", "fifteen="], ["-28", "15"], {k: v[1:3] for k, v in columns.items()}
    )
    assert rewards.tolist() == [1.0, 0.0] and means["errors"] == 1.0


def _answer_cache(directory, rows: list[dict], answers: list[str]) -> str:
    """A cache directory as `predict` writes it, holding only what `read_answers` reads: one record
    per prompt without gold with its answer (written by source 1), no trained position."""
    from fusion.sources.cache import row_key, write_shard

    records = [
        {
            "key": row_key(row),
            "positions": 0,
            "sources": [1],
            "ce": [0.0],
            "valid": [True],
            "ids": torch.zeros(1, 0, 2, dtype=torch.long),
            "logprobs": torch.zeros(1, 0, 2),
            "aligned": torch.zeros(1, 0, dtype=torch.bool),
            "answer": answer,
            "writer": 1,
            "generations": 1,
        }
        for row, answer in zip(rows, answers)
    ]
    os.makedirs(directory, exist_ok=True)
    write_shard(str(directory), "shard-r0-00000", records, vocab_size=100)
    return str(directory)


def _unlabeled_data(student: str):
    from fusion.data.datamodule import FusionDataModule

    data = FusionDataModule(tokenizer=student, domains=DOMAINS, train_size=4, val_size=2, test_size=2, unlabeled_size=3, batch_size=64)
    return data, data.load()["unlabeled"]


def test_demonstrations_from_the_cache_are_the_routed_sources_answers(tiny_student, tmp_path):
    """8 gold rows and 6 prompts without gold, one of whose cached answers is empty: the loader
    hands the stage all 14; each prompt without gold learns along its cached answer, the empty
    one along nothing, and the step logs the shares."""
    from types import SimpleNamespace

    data, unlabeled = _unlabeled_data(tiny_student)
    answers = [f"a{i}" for i in range(5)] + [""]
    cache = _answer_cache(tmp_path / "cache", unlabeled, answers)
    module = SRFTModule(
        student=tiny_student,
        demonstrations=cache,
        rewards={"fusion.stages.rewards.verified_or_agreement": 1.0},
        num_generations=2,
        max_new_tokens=3,
    )
    assert module.learns_from_unlabeled and not SRFTModule(student=tiny_student).learns_from_unlabeled
    module.load_demonstrations(data)
    data.trainer = SimpleNamespace(lightning_module=module, world_size=1, global_rank=0)
    batch = next(iter(data.train_dataloader()))
    assert len(batch["rows"]) == 14 and int(batch["labelled"].sum()) == 8
    demonstrated = module.demonstrate(batch)
    expected = {row["prompt"]: answer for row, answer in zip(unlabeled, answers)}
    for b, row in enumerate(demonstrated["rows"]):
        demo = row["response"] if row["response"] is not None else expected[row["prompt"]]
        assert row["demonstration"] == demo
        encoded = encode(module.tokenizer, row["prompt"], demo or None, data.hparams.max_length)
        width = len(encoded["input_ids"])
        assert demonstrated["input_ids"][b, :width].tolist() == encoded["input_ids"]
        assert int((demonstrated["targets"][b] != IGNORE_INDEX).sum()) == (len(encoded["input_ids"]) - encoded["prompt_length"])
    logged = _logged(module)
    torch.manual_seed(0)
    loss = module.training_step(batch, 0)
    assert torch.isfinite(loss)
    assert logged["train/demos_from_sources"] == pytest.approx(5 / 13) and logged["train/empty_demos"] == 1.0
    assert "reward/gold_rows" in logged and "reward/answer_rows" in logged
    # Each domain's mean reward, weighted by its rows, is the batch's.
    counts = collections.Counter(row["domain"] for row in batch["rows"])
    assert {k for k in logged if k.startswith("reward/domain/")} == {f"reward/domain/{d}" for d in counts}
    weighted = sum(float(logged[f"reward/domain/{d}"]) * n for d, n in counts.items()) / sum(counts.values())
    assert weighted == pytest.approx(float(logged["train/reward_mean"]), abs=1e-6)


def test_demonstrations_errors_name_the_setting_before_any_rollout(tiny_student, tmp_path):
    data, unlabeled = _unlabeled_data(tiny_student)
    student = tiny_student
    agreement = {"fusion.stages.rewards.verified_or_agreement": 1.0}

    def load(path, rewards=agreement):
        SRFTModule(student=student, demonstrations=str(path), rewards=rewards).load_demonstrations(data)

    with pytest.raises(FileNotFoundError, match=r"model.demonstrations '.*nowhere': no such directory; .* fusion.train predict"):
        load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"model.demonstrations '.*empty' holds no answers for prompts without gold"):
        load(tmp_path / "empty")
    partial = _answer_cache(tmp_path / "partial", unlabeled[1:], ["x"] * 5)
    missing = (
        rf"model.demonstrations '.*partial' has no answer for 1 of the data's 6 prompts without gold "
        rf"\(e.g. {re.escape(repr(unlabeled[0]['prompt']))}\)"
    )
    with pytest.raises(ValueError, match=missing):
        load(partial)
    whole = _answer_cache(tmp_path / "whole", unlabeled, ["x"] * 6)
    with pytest.raises(
        ValueError, match=r"model.rewards\['fusion.stages.rewards.task_correct'\] .* the data \(model.demonstrations\) has 6 prompt"
    ):
        load(whole, rewards={"fusion.stages.rewards.task_correct": 1.0})
    load(whole)


# ---------------------------------------------------------------------------------------------
# through the CLI
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fit_and_test_through_the_cli(tiny_zoo, tmp_path):
    runs = str(tmp_path / "runs")
    fused = str(tmp_path / "fused.ckpt")
    _fusion_checkpoint(tiny_zoo, fused)
    config = tiny_config(tiny_zoo, runs)
    config["trainer"]["max_steps"] = 3
    config["model"] = {
        "class_path": "fusion.stages.srft.SRFTModule",
        "init_args": {
            "student": os.path.join(tiny_zoo, "student"),
            "init_from": fused,
            "num_generations": 2,
            "max_new_tokens": 6,
            "entropy_granularity": "token",
        },
    }
    config["data"]["batch_size"] = 4
    path = tmp_path / "srft.yaml"
    path.write_text(yaml.safe_dump(config))

    main(["fit", "--config", str(path)])
    last = os.path.join(runs, "run", "version_0", "checkpoints", "last.ckpt")
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 3
    assert checkpoint["hyper_parameters"]["_class_path"] == "fusion.stages.srft.SRFTModule"
    assert checkpoint["state_dict"] and all("lora_" in k for k in checkpoint["state_dict"])
    with open(os.path.join(runs, "run", "version_0", "metrics.csv")) as f:
        header = f.readline()
    for key in (
        "train/entropy",
        "train/w_sft",
        "train/w_rl",
        "train/reward_mean",
        "train/zero_std_groups",
        "train/response_length",
        "val/acc_mean",
    ):
        assert key in header, key

    main(["test", "--config", str(path), "--ckpt_path", last])
    with open(os.path.join(runs, "run", "version_1", "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["stage"] == "srft" and metrics["mode"] == "srft"
    # The test loop's numbers are those of the checkpoint's student, computed apart from Lightning.
    trained = SRFTModule.load_from_checkpoint(last, weights_only=True)
    reference = reference_test_metrics(trained.student, trained.tokenizer, config["data"], trained.hparams.max_new_tokens)
    assert metrics["sequences"] == reference["sequences"] == {"spell_backward": 4, "chain_sum": 4}
    assert metrics["acc"] == reference["acc"] and metrics["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-5)
    # Three steps of SRFT moved the student away from the fusion checkpoint it started from.
    start = SRFTModule(student=os.path.join(tiny_zoo, "student"), init_from=fused)
    assert metrics["perplexity"] != pytest.approx(
        reference_test_metrics(start.student, start.tokenizer, config["data"], 6)["perplexity"], rel=1e-4
    )


@pytest.mark.slow
def test_fit_on_prompts_without_gold_along_a_predicted_cache(tiny_zoo, tmp_path, monkeypatch):
    """`predict` answers 6 prompts without gold with the selector's top source; SRFT with
    model.demonstrations trains on the 32 gold rows and those 6 prompts, in one batch, and runs
    no source."""
    import csv

    import fusion.sources.pool
    from fusion.sources.cache import read_answers

    fusion_config = tiny_config(
        tiny_zoo,
        str(tmp_path / "fusion"),
        source_mode="cached",
        cache_dir=str(tmp_path / "cache"),
        response_max_new_tokens=8,
        selector_prefit_steps=50,
    )
    fusion_config["data"]["unlabeled_size"] = 3
    (tmp_path / "fusion.yaml").write_text(yaml.safe_dump(fusion_config))
    main(["predict", "--config", str(tmp_path / "fusion.yaml")])
    answers = read_answers(str(tmp_path / "cache"))
    empty = sum(not a["text"] for a in answers.values())
    assert len(answers) == 6

    runs = str(tmp_path / "runs")
    config = tiny_config(tiny_zoo, runs)
    config["trainer"]["max_steps"] = 2
    config["model"] = {
        "class_path": "fusion.stages.srft.SRFTModule",
        "init_args": {
            "student": os.path.join(tiny_zoo, "student"),
            "demonstrations": str(tmp_path / "cache"),
            "rewards": {"fusion.stages.rewards.verified_or_agreement": 1.0},
            "num_generations": 2,
            "max_new_tokens": 6,
        },
    }
    config["data"] |= {"unlabeled_size": 3, "batch_size": 64}
    (tmp_path / "srft.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setattr(fusion.sources.pool, "load_frozen", lambda *a, **k: pytest.fail("a source was loaded"))
    main(["fit", "--config", str(tmp_path / "srft.yaml")])
    with open(os.path.join(runs, "run", "version_0", "metrics.csv")) as f:
        steps = [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f) if row.get("train/loss")]
    assert len(steps) == 2
    for step in steps:
        assert step["train/empty_demos"] == empty
        assert step["train/demos_from_sources"] == pytest.approx((6 - empty) / (32 + 6 - empty))
        assert {"reward/gold_rows", "reward/answer_rows", "train/sft_demo", "train/rl_demo", "train/rl_self"} <= set(step)


def test_bench_report_from_runs(tmp_path):
    """The bench's table and plots: mean ± std over seeds of the last evaluation, written atomically."""
    from fusion.bench.srft import write_report

    def point(step, acc_id, acc_ood):
        return {
            "step": step,
            "acc_id": {"a": acc_id},
            "acc_ood": {"a": acc_ood},
            "acc_id_mean": acc_id,
            "acc_ood_mean": acc_ood,
            "score_id": {"a": acc_id},
            "score_ood": {"a": acc_ood},
            "score_id_mean": acc_id,
            "score_ood_mean": acc_ood,
        }

    runs = [
        {
            "variant": v,
            "seed": seed,
            "points": [point(0, 0.5, 0.1), point(10, final, final / 2)],
            "entropy": [0.5] * 9 + [h],
            "generated_tokens": 100,
            "seconds": 1.0,
        }
        for v, seed, final, h in [("srft", 0, 0.6, 0.4), ("srft", 1, 0.8, 0.6), ("rl_only", 0, 0.4, 0.2)]
    ]
    report = {"settings": {"steps": 10, "batch_size": 2, "num_generations": 4, "seeds": [0, 1], "init_from": "x.ckpt"}, "runs": runs}
    write_report(report, str(tmp_path))
    summary = json.loads((tmp_path / "report.json").read_text())["summary"]
    assert summary["srft"]["acc_id"] == pytest.approx([0.7, math.sqrt(0.02)])  # mean and sample std of 0.6 and 0.8
    assert summary["srft"]["acc_ood"] == pytest.approx([0.35, math.sqrt(0.005)])
    assert summary["srft"]["final_entropy"] == pytest.approx([0.5, math.sqrt(0.02)])  # the last step of each run
    assert summary["rl_only"]["acc_id"] == pytest.approx([0.4, 0.0])
    table = (tmp_path / "report.md").read_text()
    assert "| srft | 0.700 ± 0.141 | 0.350 ± 0.071 |" in table and "| start | 0.500 | 0.100 |" in table
    for name in ("accuracy_id", "accuracy_ood", "score_ood", "entropy"):  # 6 x 4 inches at 100 dpi
        header = (tmp_path / f"{name}.png").read_bytes()[:24]
        assert header[:8] == b"\x89PNG\r\n\x1a\n" and (int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")) == (
            600,
            400,
        )
    assert sorted(os.listdir(tmp_path)) == [
        "accuracy_id.png",
        "accuracy_ood.png",
        "entropy.png",
        "report.json",
        "report.md",
        "score_ood.png",
    ]


def test_rollouts_are_scored_at_their_sampling_temperature(tiny_zoo, monkeypatch):
    """At T = 0.5 the log-probability rl_self trains on is the one `generate` sampled each rollout
    from: the importance ratio between the two is 1 (scored at T = 1, as before, it is not)."""
    module = SRFTModule(student=os.path.join(tiny_zoo, "student"), mode="rl_only", temperature=0.5, num_generations=3, max_new_tokens=4)
    _logged(module)
    sampled, recorded = {}, []
    generate = module.student.generate

    def generate_and_keep_scores(*args, **kwargs):
        out = generate(*args, **kwargs, output_scores=True, return_dict_in_generate=True)
        sampled["logp"] = torch.stack([torch.log_softmax(score.float(), -1) for score in out.scores], 1)  # [R, L, V], after the temperature
        sampled["tokens"] = out.sequences[:, -len(out.scores) :]
        return out.sequences

    statistics = S.token_statistics
    monkeypatch.setattr(module.student, "generate", generate_and_keep_scores)
    monkeypatch.setattr(S, "token_statistics", lambda *a, **k: recorded.append((a, k, statistics(*a, **k))) or recorded[-1][2])
    module.training_step(_module_batch(module), 0)
    (logits, targets, temperature, *_), _, rollout = recorded[1]
    assert temperature == 0.5
    eos = module.tokenizer.eos_token_id
    tokens = sampled["tokens"]
    before_eos = (tokens == eos).long().cumsum(-1) - (tokens == eos).long() == 0  # up to and including the first eos
    sampling = torch.where(before_eos, sampled["logp"].gather(-1, tokens[..., None])[..., 0], 0.0).sum(-1)  # [R]
    trained = rollout["logp"].sum(-1)  # [R], the same tokens under the training forward
    assert torch.allclose(trained, sampling, atol=1e-4)  # ratio exp(trained - sampling) = 1
    at_one = statistics(logits, targets, 1.0)["logp"].sum(-1)
    assert (at_one - sampling).abs().max() > 0.01
