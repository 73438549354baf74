"""The offline cache through the CLI: predict writes it, fit reads it, bad caches are refused."""

from __future__ import annotations

import csv
import glob
import json
import os

import pytest
import torch
import yaml

from fusion.sources.cache import cache_size, list_shards, write_shard
from fusion.train import main


@pytest.fixture(scope="module")
def cached_run(tiny_zoo, tmp_path_factory):
    """A config with the cache settings, and the cache written once by `predict`."""
    from tests.conftest import tiny_config

    root = tmp_path_factory.mktemp("cached")
    cache_dir = str(root / "cache")
    config = tiny_config(tiny_zoo, str(root / "runs"), fusion="uniform", source_mode="cached", cache_dir=cache_dir)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["predict", "--config", str(path)])
    return {"config": str(path), "cache": cache_dir, "root": root, "settings": config}


def _module_and_batch(settings: dict, source_mode: str):
    from fusion.data.datamodule import FusionDataModule
    from fusion.stages.fusion import FusionDistillModule

    model = dict(settings["model"], source_mode=source_mode)
    module = FusionDistillModule(**model)
    data = FusionDataModule(tokenizer=model["student"], **settings["data"])
    data.setup("fit")
    module.trainer = type("T", (), {"datamodule": data})()  # what setup() reads from the trainer
    batch = next(iter(data.train_dataloader()))
    return module, data, batch


@pytest.mark.slow
def test_predict_writes_shards_with_a_fingerprint(cached_run):
    shards = glob.glob(os.path.join(cached_run["cache"], "shard-r0-*"))
    assert len(shards) == 1
    with open(os.path.join(shards[0], "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["rows"] == 32  # 16 train rows per domain, 2 domains
    with open(os.path.join(cached_run["cache"], "fingerprint.json")) as f:
        fingerprint = json.load(f)
    assert {"source 0 weights", "source 1 tokenizer", "student tokenizer", "data", "top_k", "temperature"} <= set(fingerprint)
    assert fingerprint["top_k"] == 10
    assert not glob.glob(os.path.join(cached_run["cache"], "*.tmp"))  # nothing half-written left


@pytest.mark.slow
def test_cached_outputs_equal_the_online_ones(cached_run):
    """Same batch, all three sources: the cache gives the online top-K within float16 rounding."""
    from fusion.sources.cache import SourceCache

    module, data, batch = _module_and_batch(cached_run["settings"], "online")
    selected = torch.arange(3).expand(batch["input_ids"].shape[0], 3)
    online = module.pool.run(selected, batch)
    cache = SourceCache(cached_run["cache"], module.cache_fingerprint(), 3)
    cached, all_ce, all_valid = cache.lookup(batch, selected)
    assert torch.equal(cached.aligned, online.aligned)
    assert torch.equal(cached.ids, online.ids)
    present = online.ids >= 0
    assert torch.allclose(cached.logprobs[present], online.logprobs[present], atol=2e-2, rtol=1e-3)  # float16
    assert torch.allclose(all_ce, online.ce, atol=1e-6) and all_valid.all()
    # Bytes on disk per trained token per source at K = 10: the payload is 40 (uint16 ids and
    # float16 log-probs); keys, CEs and list offsets add a per-row cost, large on 32 short rows.
    trained = sum(len(f["labels"]) - f["labels"].count(-100) for f in data._features("train"))
    per_token = cache_size(cached_run["cache"]) / (trained * 3)
    assert 40 <= per_token < 60


@pytest.mark.slow
def test_cache_is_read_memory_mapped(cached_run):
    """The top-K arrays stay in the mapped Arrow files (views, not copies); a batch slices its rows."""
    from fusion.sources.cache import SourceCache

    module, data, batch = _module_and_batch(cached_run["settings"], "cached")
    cache = SourceCache(cached_run["cache"], module.cache_fingerprint(), 3)
    values, offsets = cache.blocks[0]["ids"]
    assert not values.flags.owndata and not cache.blocks[0]["logprobs"][0].flags.owndata
    assert len(offsets) == 33  # 32 records
    out, _, _ = cache.lookup(batch, torch.tensor([[2, 0]] * batch["input_ids"].shape[0]))
    full, _, _ = cache.lookup(batch, torch.arange(3).expand(batch["input_ids"].shape[0], 3))
    assert torch.equal(out.ids[:, 0], full.ids[:, 2]) and torch.equal(out.logprobs[:, 1], full.logprobs[:, 0])


@pytest.mark.slow
def test_cached_fit_trains_without_running_sources(cached_run, monkeypatch):
    import fusion.sources.pool

    def refuse(*args, **kwargs):
        raise AssertionError("a source model was loaded in cached mode")

    monkeypatch.setattr(fusion.sources.pool, "load_frozen", refuse)
    main(["fit", "--config", cached_run["config"], "--model.fusion=selector", "--model.top_k=2", "--trainer.max_steps=3"])
    (log,) = glob.glob(os.path.join(str(cached_run["root"]), "runs", "run", "version_*", "metrics.csv"))
    with open(log) as f:
        steps = [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f) if row.get("train/loss")]
    assert [int(s["step"]) for s in steps] == [0, 1, 2]
    for step in steps:  # two sources per sequence, read from the cache: none skipped, their weights sum to 1
        assert sum(step[f"select/{n}"] for n in ("spell", "sum", "noise")) == pytest.approx(2.0)
        assert sum(step[f"weight/{n}"] for n in ("spell", "sum", "noise")) == pytest.approx(1.0)
        assert step["train/source_skipped"] == 0.0


@pytest.mark.slow
def test_cache_from_other_data_is_refused(cached_run):
    with pytest.raises(ValueError, match=r"computed for a different setup \(data differ\)"):
        main(["fit", "--config", cached_run["config"], "--data.train_size=12", "--trainer.max_steps=1"])


@pytest.mark.slow
def test_cache_from_another_source_is_refused(cached_run, tiny_zoo):
    sources = [os.path.join(tiny_zoo, n) for n in ("spell", "sum", "student")]
    with pytest.raises(
        ValueError,
        match=r"\(source 2 tokenizer, source 2 weights, sources differ\): source 2 tokenizer: cache has '\w+', this run has '\w+'",
    ):
        main(["fit", "--config", cached_run["config"], "--model.sources", json.dumps(sources), "--trainer.max_steps=1"])


@pytest.mark.slow
def test_cache_with_other_top_k_is_refused(cached_run):
    with pytest.raises(ValueError, match=r"top_k: cache has 10, this run has 5"):
        main(["fit", "--config", cached_run["config"], "--model.source_top_k=5", "--trainer.max_steps=1"])


@pytest.mark.slow
def test_truncated_shard_is_refused(cached_run, tmp_path):
    import shutil

    copy = str(tmp_path / "cache")
    shutil.copytree(cached_run["cache"], copy)
    arrow = glob.glob(os.path.join(copy, "shard-*", "*.arrow"))[0]
    with open(arrow, "r+b") as f:
        f.truncate(os.path.getsize(arrow) // 2)
    with pytest.raises(
        ValueError, match=r"cache shard .*shard-r0-00000.*\.arrow is \d+ bytes, the manifest says \d+ \(truncated or missing\)"
    ):
        main(["fit", "--config", cached_run["config"], f"--model.cache_dir={copy}", "--trainer.max_steps=1"])


def test_an_interrupted_shard_write_leaves_no_shard(tmp_path, monkeypatch):
    import datasets

    def crash(self, *args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    record = {
        "key": "k",
        "positions": 1,
        "sources": [0],
        "ce": [0.5],
        "valid": [True],
        "ids": torch.zeros(1, 1, 2, dtype=torch.long),
        "logprobs": torch.zeros(1, 1, 2),
        "aligned": torch.ones(1, 1, dtype=torch.bool),
        "answer": None,
        "writer": -1,
        "generations": 0,
    }
    monkeypatch.setattr(datasets.Dataset, "save_to_disk", crash)
    with pytest.raises(KeyboardInterrupt):
        write_shard(str(tmp_path), "shard-r0-00000", [record], vocab_size=99)
    assert not glob.glob(str(tmp_path / "shard-*"))  # no shard, and no temporary left behind
    # A killed writer can leave a `.tmp` directory; the reader never takes it for a shard.
    os.makedirs(tmp_path / "shard-r0-00001.tmp")
    assert list_shards(str(tmp_path)) == []


@pytest.mark.slow
def test_missing_cache_is_named(cached_run, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model.cache_dir .*: no cache here"):
        main(["fit", "--config", cached_run["config"], f"--model.cache_dir={tmp_path}", "--trainer.max_steps=1"])
