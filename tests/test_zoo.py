"""The zoo as a cache: a source is reused only while its card's fingerprint matches its recipe."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics

import pytest
import torch

from fusion.zoo import build_zoo
from tests.conftest import tiny_zoo_recipe


@pytest.mark.slow
def test_zoo_rebuilds_a_source_whose_fingerprint_does_not_match(tiny_zoo, tmp_path):
    root = str(tmp_path / "zoo")
    shutil.copytree(tiny_zoo, root)
    weights = {name: os.stat(os.path.join(root, name, "model.safetensors")).st_mtime_ns for name in os.listdir(root)}
    recipe = tiny_zoo_recipe(root)

    build_zoo(**recipe)  # every card matches its recipe: nothing is rewritten
    assert {name: os.stat(os.path.join(root, name, "model.safetensors")).st_mtime_ns for name in weights} == weights

    noise = recipe["sources"][2]
    recipe["sources"][2] = dataclasses.replace(noise, architecture=dataclasses.replace(noise.architecture, hidden_size=16))
    cards = build_zoo(**recipe)  # the same name with another recipe: that source alone is rebuilt
    changed = {name for name in weights if os.stat(os.path.join(root, name, "model.safetensors")).st_mtime_ns != weights[name]}
    assert changed == {"noise"}
    assert cards["noise"]["recipe"]["recipe"]["architecture"]["hidden_size"] == 16
    assert json.loads(open(os.path.join(root, "noise", "config.json")).read())["hidden_size"] == 16
    assert sorted(os.listdir(root)) == sorted(weights)  # no temporary directory left behind


@pytest.mark.slow
def test_zoo_builds_only_the_named_models_with_the_seeds_of_the_whole_zoo(tiny_zoo, tmp_path):
    """`only`: a run that uses part of the zoo builds that part, and each model is the one the whole zoo has."""
    root = str(tmp_path / "part")
    recipe = tiny_zoo_recipe(root)
    names = [s.name for s in recipe["sources"]]
    cards = build_zoo(**recipe, only=[names[2]])
    assert sorted(cards) == [names[2]] and sorted(os.listdir(root)) == [names[2]]
    whole = json.loads(open(os.path.join(tiny_zoo, names[2], "card.json")).read())
    assert cards[names[2]]["recipe"] == whole["recipe"]  # the same derived seed, so the same model
    with (
        open(os.path.join(root, names[2], "model.safetensors"), "rb") as part,
        open(os.path.join(tiny_zoo, names[2], "model.safetensors"), "rb") as full,
    ):
        assert part.read() == full.read()
    try:
        build_zoo(**recipe, only=["nobody"])
    except ValueError as error:
        assert "nobody" in str(error) and names[0] in str(error)
    else:
        raise AssertionError("an unknown name was accepted")


def test_demo_builds_the_zoo_models_its_config_names():
    from fusion.demo import zoo_names

    names = zoo_names("configs/quickstart.yaml", "configs/zoo.yaml")
    assert names[0] == "student" and "confident-llama" in names and len(names) == 7
    assert "corrupted-llama" not in names  # in the zoo, not in the quick start: not built by make demo


@pytest.mark.slow
def test_demo_runs_every_method_per_seed_and_reports_the_spread(tiny_zoo, tmp_path, monkeypatch):
    """`fusion.demo --seeds`: each method once per seed, from one cache; a rerun with the same
    setting resumes, and a changed setting starts over."""
    import yaml

    from fusion import demo
    from tests.conftest import tiny_config

    config = tiny_config(tiny_zoo, str(tmp_path / "runs"))
    config["data"]["unlabeled_size"] = 8
    path = tmp_path / "quick.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)  # the demo's caches go under ./checkpoints/cache/quickstart
    argv = ["--zoo", "", "--config", str(path), "--methods", "none", "selector", "--seeds", "0", "1", "--output", str(tmp_path / "out")]
    results = demo.main(argv)
    assert [r["seed"] for r in results["selector"]] == [0, 1]
    assert all(r["generations_per_prompt"] == 1 for r in results["selector"])
    # Each row of the table is its run's test: the metrics.json that `test` wrote for it.
    for method in ("none", "selector"):
        for result in results[method]:
            (path,) = (tmp_path / "runs" / f"{method}-seed{result['seed']}").glob("version_*/metrics.json")
            written = json.loads(path.read_text())
            assert {k: result[k] for k in ("acc", "acc_mean", "perplexity", "sequences")} == {
                k: written[k] for k in ("acc", "acc_mean", "perplexity", "sequences")
            }
            assert result["sequences"] == {"spell_backward": 4, "chain_sum": 4}
    # The two seeds trained two different students (their test perplexities differ).
    assert results["selector"][0]["perplexity"] != results["selector"][1]["perplexity"]
    report = (tmp_path / "out" / "results.md").read_text()
    means = [statistics.mean(r["acc_mean"] for r in results[m]) for m in ("none", "selector")]
    assert f"{means[0]:.3f} ± " in report and f"{means[1]:.3f} ± " in report
    stamp = tmp_path / "runs" / "selector-seed1" / "checkpoints" / "demo-run.json"
    assert "--seed_everything=1" in json.loads(stamp.read_text())["arguments"]
    # A changed setting forgets the old checkpoints instead of resuming from them.
    demo.main(argv[:-5] + ["--seeds", "1", "--output", str(tmp_path / "out2"), "--trainer.max_steps=2"])
    assert json.loads(stamp.read_text())["arguments"][-1] == "--trainer.max_steps=2"
    last = torch.load(tmp_path / "runs" / "selector-seed1" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert last["global_step"] == 2
