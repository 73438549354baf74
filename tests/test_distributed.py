"""DDP on CPU: 2 processes (gloo) fit and test through the CLI; the metrics are the whole split's,
equal to one process's, and only rank 0 writes files."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import yaml

from fusion.train import main
from tests.conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DDP = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
PERPLEXITY_TOLERANCE = 1e-5  # relative: the same rows in other batches sum their log-probabilities in another order


def _cli(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "fusion.train", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def _metrics(run_dir: str, version: int) -> dict:
    with open(os.path.join(run_dir, "run", f"version_{version}", "metrics.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_ddp_two_processes_fit_and_test(tiny_zoo, tmp_path):
    run_dir = str(tmp_path / "runs")
    config = tiny_config(tiny_zoo, run_dir, fusion="selector", top_k=1)
    # 8 test rows (4 per domain): each process gets 4, none repeated by the DistributedSampler.
    config["trainer"].update(max_steps=4, val_check_interval=4)
    config["trainer"]["callbacks"] = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": os.path.join(run_dir, "checkpoints"), "save_last": True, "save_top_k": 0},
        }
    ]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))

    _cli("fit", "--config", str(path), *DDP)
    _cli("test", "--config", str(path), "--ckpt_path", "last", *DDP)
    two = _metrics(run_dir, 1)
    main(["test", "--config", str(path), "--ckpt_path", "last"])  # one process, the same checkpoint and rows
    one = _metrics(run_dir, 2)

    # The whole split on both: a process left alone with its half would count 4 rows.
    assert two["sequences"] == one["sequences"] == {"chain_sum": 4, "spell_backward": 4}
    print(f"perplexity: 2 processes {two['perplexity']!r}, 1 process {one['perplexity']!r}")
    for key in ("perplexity", "selection_entropy"):
        assert two.pop(key) == pytest.approx(one.pop(key), rel=PERPLEXITY_TOLERANCE)
    assert two == one  # accuracy per domain and mean, selection shares (counts over counts): equal
    assert sum(two["selection_share"].values()) == pytest.approx(1.0)  # top_k = 1 source per row

    # Rank 0 alone wrote: the checkpoint, one log directory per run, metrics.json once.
    written = sorted(os.path.relpath(p, tmp_path) for p in glob.glob(str(tmp_path / "**"), recursive=True) if os.path.isfile(p))
    logs = ["config.yaml", "hparams.yaml", "metrics.csv"]
    assert written == sorted(
        ["config.yaml", "runs/checkpoints/last.ckpt"]
        + [f"runs/run/version_0/{f}" for f in logs]
        + [f"runs/run/version_{v}/{f}" for v in (1, 2) for f in logs + ["metrics.json"]]
    ), written
