"""Exact resume: a fit killed with SIGKILL mid-epoch and resumed with `--ckpt_path last` ends with
the weights and test metrics of the uninterrupted run."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from fusion.resume import ResumableLoader
from fusion.train import main
from tests.conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_STEPS, EVERY, BATCHES_PER_EPOCH = 9, 3, 4  # 2 domains x 16 rows / batch 8: checkpoints at 3, 6 and 9, all mid-epoch
WEIGHT_TOLERANCE = 1e-6  # max abs difference of any adapter or selector weight


def _write_config(zoo: str, run_dir: str) -> str:
    # Random draws in every step: Gumbel exploration noise on selection and LoRA dropout.
    lora = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": "all-linear"}
    config = tiny_config(zoo, run_dir, fusion="selector", top_k=1, exploration_noise=1.0, exploration_steps=MAX_STEPS, lora=lora)
    config["trainer"].update(max_steps=MAX_STEPS, limit_val_batches=0)
    config["trainer"]["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": os.path.join(run_dir, "checkpoints"), "save_last": True, "save_top_k": 0, "every_n_train_steps": EVERY}},
    ]
    path = os.path.join(run_dir, "config.yaml")
    os.makedirs(run_dir, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return path


def _load(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _test_metrics(config: str, run_dir: str) -> dict:
    main(["test", "--config", config, "--ckpt_path", "last"])
    (path,) = glob.glob(os.path.join(run_dir, "run", "version_*", "metrics.json"))
    with open(path) as f:
        return json.load(f)


def test_sigkill_mid_epoch_then_resume_is_exact(tiny_zoo, tmp_path):
    killed_dir, reference_dir = str(tmp_path / "killed"), str(tmp_path / "reference")
    killed_config, reference_config = _write_config(tiny_zoo, killed_dir), _write_config(tiny_zoo, reference_dir)
    last = os.path.join(killed_dir, "checkpoints", "last.ckpt")

    process = subprocess.Popen([sys.executable, "-m", "fusion.train", "fit", "--config", killed_config], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not os.path.exists(last) and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    killed = _load(last)
    killed_at = killed["global_step"]
    assert 0 < killed_at < MAX_STEPS and killed_at % BATCHES_PER_EPOCH != 0, f"killed at step {killed_at}, not mid-epoch"

    main(["fit", "--config", killed_config, "--ckpt_path", "last"])  # finds checkpoints/last.ckpt
    main(["fit", "--config", reference_config])
    resumed = _load(last)
    reference = _load(os.path.join(reference_dir, "checkpoints", "last.ckpt"))
    assert resumed["global_step"] == reference["global_step"] == MAX_STEPS
    weights = reference["state_dict"]
    assert resumed["state_dict"].keys() == weights.keys() and any(k.startswith("selector.") for k in weights)
    difference = max(float((resumed["state_dict"][k] - v).abs().max()) for k, v in weights.items())
    print(f"kill at step {killed_at}, resume: max abs weight difference to the uninterrupted run {difference:.3g}")
    assert difference <= WEIGHT_TOLERANCE
    # Not vacuous: the steps after the kill moved the weights by far more than the tolerance.
    moved = max(float((killed["state_dict"][k] - v).abs().max()) for k, v in weights.items())
    assert moved > 1e3 * WEIGHT_TOLERANCE

    resumed_metrics, reference_metrics = _test_metrics(killed_config, killed_dir), _test_metrics(reference_config, reference_dir)
    print("test metrics, resumed:", resumed_metrics, "\nuninterrupted:", reference_metrics)
    assert resumed_metrics["sequences"] == {"chain_sum": 4, "spell_backward": 4}
    assert resumed_metrics.pop("perplexity") == pytest.approx(reference_metrics.pop("perplexity"), rel=1e-6)
    assert resumed_metrics == reference_metrics  # accuracy per domain, selection shares: equal


def _epoch(loader: ResumableLoader, epoch: int, batches: int | None = None) -> list[list[int]]:
    loader.sampler.set_epoch(epoch)  # what Lightning does at each epoch start
    out = []
    for batch in loader:
        out.append(batch.tolist())
        if batches is not None and len(out) == batches:
            break
    return out


def test_loader_order_is_a_function_of_seed_and_epoch():
    first, second = ResumableLoader(list(range(12)), batch_size=4, seed=0), ResumableLoader(list(range(12)), batch_size=4, seed=0)
    torch.manual_seed(123)  # the global RNG plays no part
    assert _epoch(first, 3) == _epoch(second, 3)
    assert _epoch(first, 3) != _epoch(first, 4)
    assert _epoch(first, 3) != _epoch(ResumableLoader(list(range(12)), batch_size=4, seed=1), 3)
    assert sorted(sum(_epoch(first, 3), [])) == list(range(12))


def test_loader_resumes_mid_epoch_where_it_stopped():
    uninterrupted = ResumableLoader(list(range(20)), batch_size=4, seed=0)
    epoch_2, epoch_3 = _epoch(uninterrupted, 2), _epoch(uninterrupted, 3)
    interrupted = ResumableLoader(list(range(20)), batch_size=4, seed=0)
    assert _epoch(interrupted, 2, batches=2) == epoch_2[:2]
    state = interrupted.state_dict()
    assert state == {"epoch": 2, "batches": 2}
    resumed = ResumableLoader(list(range(20)), batch_size=4, seed=0)
    resumed.load_state_dict(state)
    assert len(resumed) == 5  # Lightning counts the epoch's batches; it skips the first 2 itself
    assert _epoch(resumed, 2) == epoch_2[2:]
    assert resumed.state_dict() == {"epoch": 2, "batches": 5}
    assert _epoch(resumed, 3) == epoch_3  # the next epoch is whole


def test_loader_shards_each_epoch_across_processes():
    whole = sum(_epoch(ResumableLoader(list(range(16)), batch_size=2, seed=0), 1), [])
    shards = [sum(_epoch(ResumableLoader(list(range(16)), batch_size=2, seed=0, num_replicas=2, rank=r), 1), []) for r in (0, 1)]
    assert shards[0] == whole[0::2] and shards[1] == whole[1::2]


def test_loader_takes_a_sampler_lightning_passes():
    """`overfit_batches` re-creates the loader with a sequential sampler: it is used as it is."""
    from torch.utils.data import SequentialSampler

    loader = ResumableLoader(list(range(6)), batch_size=2, sampler=SequentialSampler(range(6)))
    assert [b.tolist() for b in loader] == [[0, 1], [2, 3], [4, 5]]
