"""The zoo as a cache: a source is reused only while its card's fingerprint matches its recipe."""

from __future__ import annotations

import json
import os

from fusion.zoo import Architecture, SourceRecipe, build_zoo

SMALL = Architecture(family="llama", hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)


def test_zoo_rebuilds_a_source_whose_fingerprint_does_not_match(tmp_path):
    def build(hidden_size: int) -> dict:
        architecture = Architecture(**{**SMALL.__dict__, "hidden_size": hidden_size})
        return build_zoo(sources=[SourceRecipe("noise", kind="random", architecture=architecture)],
                         student=SourceRecipe("student", kind="random", architecture=SMALL),
                         output_dir=str(tmp_path), domains=["chain_sum"], test_size=2, workers=1)

    weights = tmp_path / "noise" / "model.safetensors"
    build(16)
    first = os.stat(weights).st_mtime_ns
    build(16)  # same recipe: reused, not rewritten
    assert os.stat(weights).st_mtime_ns == first
    cards = build(24)  # another recipe under the same name: rebuilt
    assert os.stat(weights).st_mtime_ns != first
    assert cards["noise"]["recipe"]["recipe"]["architecture"]["hidden_size"] == 24
    assert json.loads((tmp_path / "noise" / "config.json").read_text())["hidden_size"] == 24
    assert sorted(os.listdir(tmp_path)) == ["noise", "student"]  # no temporary directory left
