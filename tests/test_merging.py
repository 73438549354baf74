"""Full-model merging with mergekit (`fusion.merging.merge_models`) on tiny models built from
config (nothing downloaded): each method against its formula, parameter by parameter."""

from __future__ import annotations

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
