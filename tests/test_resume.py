"""Exact resume: a fit stopped mid-run (SIGKILL mid-epoch, SIGTERM at an epoch's end) and resumed
with `--ckpt_path last` ends with the weights and test metrics of the uninterrupted run."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
import yaml

from fusion.train import main
from fusion.utils.resume import ResumableLoader
from tests.conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_STEPS, EVERY, BATCHES_PER_EPOCH = 9, 3, 4  # 2 domains x 16 rows / batch 8: checkpoints at 3, 6 and 9, all mid-epoch
WEIGHT_TOLERANCE = 1e-6  # max abs difference of any adapter or selector weight


class SigtermAtEpochEnd(L.Callback):
    """Sends this process SIGTERM in the end-of-epoch hooks of the first epoch."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 0:
            os.kill(os.getpid(), signal.SIGTERM)


def _write_config(zoo: str, run_dir: str, *callbacks: dict) -> str:
    # Random draws in every step: Gumbel exploration noise on selection and LoRA dropout.
    lora = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": "all-linear"}
    config = tiny_config(zoo, run_dir, fusion="selector", top_k=1, exploration_noise=1.0, exploration_steps=MAX_STEPS, lora=lora)
    config["trainer"].update(max_steps=MAX_STEPS, limit_val_batches=0)
    checkpoints = os.path.join(run_dir, "checkpoints")
    config["trainer"]["callbacks"] = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": checkpoints, "save_last": True, "save_top_k": 0, "every_n_train_steps": EVERY},
        },
        {"class_path": "lightning.pytorch.callbacks.OnExceptionCheckpoint", "init_args": {"dirpath": checkpoints}},
        *callbacks,
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


@pytest.fixture(scope="module")
def uninterrupted(tiny_zoo, tmp_path_factory) -> tuple[dict, dict]:
    """Final weights and test metrics of the run that is never stopped."""
    run_dir = str(tmp_path_factory.mktemp("uninterrupted"))
    config = _write_config(tiny_zoo, run_dir)
    main(["fit", "--config", config])
    return _load(os.path.join(run_dir, "checkpoints", "last.ckpt")), _test_metrics(config, run_dir)


def _assert_same_as_uninterrupted(config: str, run_dir: str, interrupted: dict, uninterrupted: tuple[dict, dict]) -> None:
    reference, reference_metrics = uninterrupted
    resumed = _load(os.path.join(run_dir, "checkpoints", "last.ckpt"))
    assert resumed["global_step"] == reference["global_step"] == MAX_STEPS
    weights = reference["state_dict"]
    assert resumed["state_dict"].keys() == weights.keys() and any(k.startswith("selector.") for k in weights)
    difference = max(float((resumed["state_dict"][k] - v).abs().max()) for k, v in weights.items())
    print(f"stopped at step {interrupted['global_step']}, resumed: max abs weight difference to the uninterrupted run {difference:.3g}")
    assert difference <= WEIGHT_TOLERANCE
    # Not vacuous: the steps after the interruption moved the weights by far more than the tolerance.
    moved = max(float((interrupted["state_dict"][k] - v).abs().max()) for k, v in weights.items())
    assert moved > 1e3 * WEIGHT_TOLERANCE

    metrics = _test_metrics(config, run_dir)
    assert metrics["sequences"] == {"chain_sum": 4, "spell_backward": 4}
    assert metrics.pop("perplexity") == pytest.approx(reference_metrics["perplexity"], rel=1e-6)
    assert metrics == {k: v for k, v in reference_metrics.items() if k != "perplexity"}  # accuracy, selection shares


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_exact(tiny_zoo, tmp_path, uninterrupted):
    run_dir = str(tmp_path / "killed")
    config = _write_config(tiny_zoo, run_dir)
    last = os.path.join(run_dir, "checkpoints", "last.ckpt")
    process = subprocess.Popen(
        [sys.executable, "-m", "fusion.train", "fit", "--config", config], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 180
    while not os.path.exists(last) and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    killed = _load(last)
    assert 0 < killed["global_step"] < MAX_STEPS and killed["global_step"] % BATCHES_PER_EPOCH != 0, "not killed mid-epoch"

    main(["fit", "--config", config, "--ckpt_path", "last"])  # finds checkpoints/last.ckpt
    _assert_same_as_uninterrupted(config, run_dir, killed, uninterrupted)


@pytest.mark.slow
def test_sigterm_at_an_epoch_end_then_resume_is_exact(tiny_zoo, tmp_path, uninterrupted):
    """SIGTERM in the epoch-end hooks: OnExceptionCheckpoint saves, and the resume starts the next
    epoch at its first batch (Lightning 2.6 alone would end that epoch after one batch)."""
    run_dir = str(tmp_path / "terminated")
    stopping = _write_config(tiny_zoo, run_dir, {"class_path": "tests.test_resume.SigtermAtEpochEnd"})
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", stopping])
    assert exit_info.value.code in (None, 0)
    terminated = _load(os.path.join(run_dir, "checkpoints", "on_exception.ckpt"))
    assert terminated["global_step"] == BATCHES_PER_EPOCH  # the whole first epoch, nothing more

    config = _write_config(tiny_zoo, run_dir)
    main(["fit", "--config", config, "--ckpt_path", "last"])  # on_exception.ckpt, newer than last.ckpt of step 3
    _assert_same_as_uninterrupted(config, run_dir, terminated, uninterrupted)


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
