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
