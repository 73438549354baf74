"""The student's learning-rate schedule, pinned by hand."""

from __future__ import annotations

import math

import pytest
import torch

from fusion.stages.student import warmup_cosine


def _factors(warmup: int, total: int, steps: list[int], decay_fraction: float = 1.0) -> list[float]:
    """The learning rate (base rate 1) at each of `steps`, as the scheduler steps through them."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = warmup_cosine(optimizer, warmup, total, decay_fraction)
    rates = []
    for step in range(max(steps) + 1):
        if step in steps:
            rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_warmup_multiplies_a_cosine_over_the_whole_run():
    """warmup 10, 100 steps: factor(s) = min(1, (s + 1) / 10) * 0.5 * (1 + cos(pi * s / 100))."""
    steps = [0, 4, 9, 10, 50, 75, 100, 130]
    expected = [
        0.1,  # step 0: 1/10 of the rate, times cos(0) = 1
        0.5 * 0.5 * (1 + math.cos(0.04 * math.pi)),  # 0.49803: still warming up, the cosine already under 1
        0.5 * (1 + math.cos(0.09 * math.pi)),  # 0.98015: the last warmup step
        0.5 * (1 + math.cos(0.10 * math.pi)),  # 0.97553
        0.5,  # half way: cos(pi / 2) = 0
        0.5 * (1 - math.sqrt(0.5)),  # 0.14645
        0.0,  # the end
        0.0,  # and past it
    ]
    assert _factors(10, 100, steps) == pytest.approx(expected, abs=1e-12)
    assert expected[1] == pytest.approx(0.498029, abs=1e-6) and expected[2] == pytest.approx(0.980147, abs=1e-6)


def test_decay_fraction_holds_the_rate_then_decays_over_the_tail():
    """decay_fraction 0.2 of 100 steps: full rate until step 80, then a cosine to 0 at step 100."""
    steps = [0, 9, 50, 80, 85, 90, 95, 100]
    expected = [0.1, 1.0, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi * 0.25)), 0.5, 0.5 * (1 + math.cos(math.pi * 0.75)), 0.0]
    assert _factors(10, 100, steps, decay_fraction=0.2) == pytest.approx(expected, abs=1e-12)
    # 1.0 is the whole-run cosine, step for step.
    assert _factors(10, 100, list(range(0, 101, 7)), 1.0) == pytest.approx(_factors(10, 100, list(range(0, 101, 7))), abs=1e-15)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="decay_fraction"):
            warmup_cosine(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 10, 100, bad)


def test_no_warmup_and_not_transformers_schedule():
    # warmup 0 or 1: the cosine alone from the first step.
    assert _factors(0, 4, [0, 1, 2, 4]) == pytest.approx([1.0, 0.5 * (1 + math.sqrt(0.5)), 0.5, 0.0], abs=1e-12)
    assert _factors(1, 4, [0, 2]) == pytest.approx([1.0, 0.5], abs=1e-12)
    # transformers' cosine-with-warmup starts at 0 and runs its cosine after the warmup only:
    # another learning rate at every step (here at steps 0, 4 and 50 of 10 + 90).
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = get_cosine_schedule_with_warmup(optimizer, 10, 100)
    values = [theirs.lr_lambdas[0](s) for s in (0, 4, 50)]
    assert values == pytest.approx([0.0, 0.4, 0.5 * (1 + math.cos(math.pi * 40 / 90))], abs=1e-12)
    assert _factors(10, 100, [0, 4, 50]) != pytest.approx(values, abs=1e-3)


def test_lora_b_matrices_learn_at_their_own_rate():
    """LoRA+: with `lora_b_lr_ratio` 8 the B matrices take AdamW steps 8 times those of A. Adam's
    first step moves every weight with a gradient by the rate itself (m / sqrt(v) = +-1), and B
    starts at zero, so after one step each B entry has moved by 8 * lr and A not at all."""
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from fusion.stages.student import StudentStage

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    student = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    lr = 1e-3
    for ratio, groups in ((1.0, 1), (8.0, 2)):
        stage = SimpleNamespace(student=student, settings=SimpleNamespace(learning_rate=lr, lora_b_lr_ratio=ratio))
        param_groups = StudentStage.parameter_groups(stage)
        assert len(param_groups) == groups
        assert sum(len(g["params"]) for g in param_groups) == sum(p.requires_grad for p in student.parameters()) == 4
    before = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(param_groups, weight_decay=0.0, eps=1e-12)
    student(input_ids=torch.randint(0, 32, (2, 6)), labels=torch.randint(0, 32, (2, 6))).loss.backward()
    optimizer.step()
    for name, p in student.named_parameters():
        if p.requires_grad:
            moved = (p.detach() - before[name]).abs()
            expected = 8 * lr if ".lora_B." in name else 0.0
            assert moved.max().item() == pytest.approx(expected, rel=1e-4, abs=1e-9), name
