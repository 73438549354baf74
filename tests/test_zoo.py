"""The zoo as a cache: a source is reused only while its card's fingerprint matches its recipe."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

from fusion.zoo import build_zoo
from tests.conftest import tiny_zoo_recipe


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


def test_zoo_builds_only_the_named_models_with_the_seeds_of_the_whole_zoo(tiny_zoo, tmp_path):
    """`only`: a run that uses part of the zoo builds that part, and each model is the one the whole zoo has."""
    root = str(tmp_path / "part")
    recipe = tiny_zoo_recipe(root)
    names = [s.name for s in recipe["sources"]]
    cards = build_zoo(**recipe, only=[names[2]])
    assert sorted(cards) == [names[2]] and sorted(os.listdir(root)) == [names[2]]
    whole = json.loads(open(os.path.join(tiny_zoo, names[2], "card.json")).read())
    assert cards[names[2]]["recipe"] == whole["recipe"]  # the same derived seed, so the same model
    with open(os.path.join(root, names[2], "model.safetensors"), "rb") as part, open(os.path.join(tiny_zoo, names[2], "model.safetensors"), "rb") as full:
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
