"""Full-model merging with mergekit (`fusion.merging.merge_models`) on tiny models built from
config (nothing downloaded): each method against its formula, parameter by parameter."""

from __future__ import annotations

import math
import os

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from fusion import merging
from fusion.data.tokenizer import build_char_tokenizer, load_tokenizer
from fusion.zoo import Architecture, build_model

pytest.importorskip("mergekit")

TINY = Architecture(family="qwen2", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """A base and two 'fine-tunes' of it (the base plus Gaussian noise), with the char tokenizer."""
    root = tmp_path_factory.mktemp("merge")
    tokenizer = build_char_tokenizer()
    paths = {}
    for name, seed in (("base", None), ("m1", 1), ("m2", 2)):
        model = build_model(TINY, tokenizer, seed=0)
        if seed is not None:
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=generator))
        paths[name] = str(root / name)
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths


def weights(path: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_linear_is_the_weighted_mean(models, tmp_path):
    out = merging.merge_models([models["m1"], models["m2"]], str(tmp_path / "linear"), "linear", weights=[1.0, 3.0])
    m1, m2, merged = weights(models["m1"]), weights(models["m2"]), weights(out)
    assert max_difference(merged, {k: (m1[k] + 3 * m2[k]) / 4 for k in m1}) < 1e-6
    assert max_difference(merged, m1) > 1e-2
    # safetensors, the first model's tokenizer (char: 99 tokens), the merge's own config
    files = set(os.listdir(out))
    assert {"model.safetensors", "config.json", "tokenizer.json", "mergekit_config.yml"} <= files
    assert not any(f.endswith(".bin") for f in files)
    assert len(load_tokenizer(out)) == len(load_tokenizer(models["m1"])) == 99


def test_task_arithmetic_adds_the_weighted_task_vectors(models, tmp_path):
    out = merging.merge_models(
        [models["m1"], models["m2"]], str(tmp_path / "ta"), "task_arithmetic", base=models["base"], weights=[0.5, 0.25]
    )
    base, m1, m2, merged = weights(models["base"]), weights(models["m1"]), weights(models["m2"]), weights(out)
    expected = {k: base[k] + 0.5 * (m1[k] - base[k]) + 0.25 * (m2[k] - base[k]) for k in base}
    assert max_difference(merged, expected) < 1e-6

    # DARE at density 1 drops nothing and rescales by 1: task arithmetic again, whatever the seed.
    dare = merging.merge_models(
        [models["m1"], models["m2"]], str(tmp_path / "dare1"), "dare_linear", base=models["base"], weights=[0.5, 0.25], density=1.0, seed=3
    )
    assert max_difference(weights(dare), merged) < 1e-6


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear"])
def test_sparse_methods_keep_part_of_each_task_vector(models, tmp_path, method):
    """At density 0.5 each task vector keeps half its entries (TIES: the largest; DARE: at random,
    by the seed): the merged weights differ from the base, but a quarter of the entries (those
    dropped from both task vectors) are exactly the base's."""

    def run(name, seed):
        return weights(
            merging.merge_models(
                [models["m1"], models["m2"]], str(tmp_path / name), method, base=models["base"], weights=1.0, density=0.5, seed=seed
            )
        )

    base, merged = weights(models["base"]), run("a", 0)
    assert all(torch.isfinite(v).all() for v in merged.values())
    assert max_difference(merged, base) > 1e-2
    unchanged = [float((merged[k] == base[k]).float().mean()) for k in base if base[k].numel() >= 1024]
    assert all(0.2 < share < 0.3 for share in unchanged), unchanged  # 0.5 * 0.5 of each weight matrix
    if method.startswith("dare"):
        assert max_difference(run("b", 0), merged) == 0.0  # a fixed seed: the same drops
        assert max_difference(run("c", 1), merged) > 1e-3  # another seed: other drops


def test_slerp_runs_from_the_first_model_to_the_second(models, tmp_path):
    m1, m2 = weights(models["m1"]), weights(models["m2"])
    ends = [weights(merging.merge_models([models["m1"], models["m2"]], str(tmp_path / f"t{t}"), "slerp", t=t)) for t in (0.0, 1.0)]
    assert max_difference(ends[0], m1) < 1e-6 and max_difference(ends[1], m2) < 1e-6
    middle = weights(merging.merge_models([models["m1"], models["m2"]], str(tmp_path / "half"), "slerp", t=0.5))
    assert max_difference(middle, m1) > 1e-3 and max_difference(middle, m2) > 1e-3


# ------------------------------------------------------------------ each method on hand tensors

HAND = Architecture(family="qwen2", hidden_size=8, num_layers=1, num_heads=2, intermediate_size=64)
NORM, DOWN, OUT = "model.norm.weight", "model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.o_proj.weight"
# TIES at density 0.5 (4 of 8 kept per task vector):
#   task 1  [3, -1, 0.5, 2, 1.5, 0.1, -0.7, -2.5]  keeps 3, 2, 1.5, -2.5   -> [3, 0, 0, 2, 1.5, 0, 0, -2.5]
#   task 2  [2, 4, 0.2, -2.5, 0.5, 1, -0.3, -1.8]  keeps 2, 4, -2.5, -1.8  -> [2, 4, 0, -2.5, 0, 0, 0, -1.8]
#   elected sign (of the sum) [+, +, +, -, +, +, +, -]: entry 3's +2 disagrees and is dropped;
#   disjoint mean of the agreeing kept entries [(3 + 2) / 2, 4, 0, -2.5, 1.5, 0, 0, (-2.5 - 1.8) / 2].
TIES_TASKS = ([3.0, -1.0, 0.5, 2.0, 1.5, 0.1, -0.7, -2.5], [2.0, 4.0, 0.2, -2.5, 0.5, 1.0, -0.3, -1.8])
TIES_MERGED = [2.5, 4.0, 0.0, -2.5, 1.5, 0.0, 0.0, -2.15]


@pytest.fixture(scope="module")
def hand_models(tmp_path_factory) -> dict[str, str]:
    """A base and models that differ from it in one tensor each, set by hand: ties1 and ties2 in
    the final norm (the TIES task vectors above), dare in the MLP's down projection (512 entries
    of magnitude 0.01 to 0.07, alternating sign), slerp1 and slerp2 in the attention output
    projection (the identity, and the permutation sending row i to e_(i+1 mod 8): every row a
    unit vector orthogonal to the other model's)."""
    root = tmp_path_factory.mktemp("hand")
    tokenizer = build_char_tokenizer()
    down = (0.01 * (1 + torch.arange(512) % 7) * (1 - 2 * (torch.arange(512) % 2))).reshape(8, 64)
    changes = {
        "base": {},
        "ties1": {NORM: lambda w: w + torch.tensor(TIES_TASKS[0])},
        "ties2": {NORM: lambda w: w + torch.tensor(TIES_TASKS[1])},
        "dare": {DOWN: lambda w: w + down},
        "slerp1": {OUT: lambda w: torch.eye(8)},
        "slerp2": {OUT: lambda w: torch.eye(8).roll(1, dims=1)},
    }
    paths = {}
    for name, change in changes.items():
        model = build_model(HAND, tokenizer, seed=0)
        with torch.no_grad():
            for key, value in model.state_dict().items():
                if key in change:
                    value.copy_(change[key](value.clone()))
        paths[name] = str(root / name)
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    paths["down"] = down
    return paths


def _only_changed(merged: dict[str, torch.Tensor], base: dict[str, torch.Tensor], key: str) -> None:
    """Every tensor but `key` is the base's: those task vectors are zero."""
    assert max_difference({k: v for k, v in merged.items() if k != key}, {k: v for k, v in base.items() if k != key}) < 1e-6


@pytest.mark.slow
def test_ties_trims_elects_the_sign_and_takes_the_disjoint_mean(hand_models, tmp_path):
    out = merging.merge_models(
        [hand_models["ties1"], hand_models["ties2"]], str(tmp_path / "ties"), "ties", base=hand_models["base"], weights=1.0, density=0.5
    )
    base, merged = weights(hand_models["base"]), weights(out)
    assert torch.allclose(merged[NORM] - base[NORM], torch.tensor(TIES_MERGED), atol=1e-6)
    _only_changed(merged, base, NORM)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_drops_at_random_and_rescales_what_it_keeps(hand_models, tmp_path, method):
    """One task vector at density 0.5: each entry is either the base's (dropped) or the base's
    plus the task vector's times one factor s, mergekit's rescaling that keeps the task vector's
    L1 norm, s = |tau|_1 / |kept tau|_1 (about 1 / density = 2). Alone, the sign election of
    dare_ties keeps every kept entry: the two methods agree."""
    out = merging.merge_models([hand_models["dare"]], str(tmp_path / method), method, base=hand_models["base"], density=0.5, seed=7)
    base, merged, task = weights(hand_models["base"]), weights(out), hand_models["down"]
    delta = merged[DOWN] - base[DOWN]
    kept = delta != 0
    assert torch.equal(merged[DOWN][~kept], base[DOWN][~kept])  # dropped: exactly the base
    assert 0.4 < float(kept.float().mean()) < 0.6
    scale = float(task.abs().sum() / task[kept].abs().sum())
    assert 1.6 < scale < 2.4
    assert torch.allclose(delta[kept], scale * task[kept], atol=1e-6)
    _only_changed(merged, base, DOWN)


@pytest.mark.slow
def test_slerp_of_orthogonal_unit_rows_follows_the_great_circle(hand_models, tmp_path):
    """Each row of the two projections is a unit vector orthogonal to the other's (angle pi / 2):
    at t the merged row is cos(t pi / 2) a + sin(t pi / 2) b; at t = 0.5 the normalized sum
    (a + b) / sqrt(2), where linear interpolation would give (a + b) / 2."""
    base = weights(hand_models["base"])
    a, b = torch.eye(8), torch.eye(8).roll(1, dims=1)
    for t, (ca, cb) in ((0.5, (2**-0.5, 2**-0.5)), (0.25, (math.cos(math.pi / 8), math.sin(math.pi / 8)))):
        out = merging.merge_models([hand_models["slerp1"], hand_models["slerp2"]], str(tmp_path / f"t{t}"), "slerp", t=t)
        merged = weights(out)
        assert torch.allclose(merged[OUT], ca * a + cb * b, atol=1e-6), t
        _only_changed(merged, base, OUT)


def test_lora_adapters_are_folded_into_the_base_first(models, tmp_path):
    """Adapter directories of `base`: task arithmetic over them is peft's exact `cat` merge."""
    adapters = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(models["base"]), LoraConfig(r=2, lora_alpha=4, target_modules="all-linear")
        )
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.1)
        adapters.append(str(tmp_path / f"adapter{seed}"))
        model.save_pretrained(adapters[-1])
    out = merging.merge_models(adapters, str(tmp_path / "folded"), "task_arithmetic", base=models["base"], weights=0.5)
    expected = merging.merge_adapters(models["base"], adapters, "cat", 0.5).state_dict()
    assert max_difference(weights(out), dict(expected)) < 1e-5
    assert max_difference(weights(out), weights(models["base"])) > 1e-3
    assert len(load_tokenizer(out)) == 99  # the base's tokenizer


def test_bad_merges_are_refused(models, tmp_path):
    two = [models["m1"], models["m2"]]
    with pytest.raises(ValueError, match=r"merge method must be one of .*'dare_linear'\), got 'average'"):
        merging.merge_models(two, str(tmp_path / "x"), "average")
    with pytest.raises(ValueError, match=r"slerp interpolates exactly 2 models, got 3"):
        merging.merge_models(two + [models["base"]], str(tmp_path / "x"), "slerp")
    with pytest.raises(ValueError, match=r"ties merges task vectors m_i - base: set base"):
        merging.merge_models(two, str(tmp_path / "x"), "ties")
    with pytest.raises(ValueError, match=r"3 merge weights for 2 models"):
        merging.merge_models(two, str(tmp_path / "x"), "linear", weights=[1, 2, 3])
    with pytest.raises(FileNotFoundError, match=r"models\[1\]: 'org/model' is neither a model directory .* never the hub"):
        merging.merge_models([models["m1"], "org/model"], str(tmp_path / "x"), "linear")
    assert not os.path.exists(tmp_path / "x")


def test_without_mergekit_the_error_names_the_extra(models, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mergekit.config", None)  # as if not installed
    with pytest.raises(ImportError, match=r"full-model merging needs mergekit, which is not installed: pip install 'fusion\[merge\]'"):
        merging.merge_models([models["m1"], models["m2"]], str(tmp_path / "x"), "linear")
