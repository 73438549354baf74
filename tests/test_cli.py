"""End to end through the CLI entry point on the tiny zoo: fit, test, resume, export; configs parse."""

from __future__ import annotations

import csv
import glob
import json
import os
import sys

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from fusion import export, zoo
from fusion.bench import quality
from fusion.data.tokenizer import load_tokenizer
from fusion.stages.fusion import FusionDistillModule
from fusion.train import main
from tests.conftest import reference_test_metrics

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.yaml")))


# bench configs read over another one's settings, as their commands give them: name -> the one it extends
OVERLAYS = {
    "bench_on_policy.yaml": "bench_unlabeled.yaml",
    "bench_unlabeled_srft.yaml": "bench_unlabeled.yaml",
    "bench_unlabeled_srft_weak.yaml": "bench_unlabeled.yaml",
    "bench_levers_4800.yaml": "bench_levers.yaml",
}


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_parses(path, capsys):
    """Each YAML in configs/ validates against the code's signatures (printed, not run)."""
    name = os.path.basename(path)
    with pytest.raises(SystemExit) as exit_info:
        if name == "zoo.yaml":
            zoo.main(["--config", path, "--print_config"])
        elif name in OVERLAYS:  # read over the settings of the benchmark it extends
            quality.main(["--config", path.replace(name, OVERLAYS[name]), "--config", path, "--print_config"])
        elif name.startswith("bench"):  # the quality benchmark's own settings (its train section: test_bench_quality.py)
            quality.main(["--config", path, "--print_config"])
        else:
            main(["fit", "--config", path, "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    expected = {
        "zoo.yaml": ["sources:"],
        "bench.yaml": ["pools:", "methods:", "train:"],
        "bench_unlabeled.yaml": [
            "pools:",
            "methods:",
            "chain_sum: 6000",
            "chain_sum-qwen2-digits",
            "use_rslora: true",
            "selector_loss: likelihood",
            "lr_decay_fraction: 0.2",
        ],
        "bench_levers.yaml": ["pools:", "lr_decay_fraction: 0.2", "use_rslora: true"],
        "bench_levers_4800.yaml": ["steps: 4800", "output: checkpoints/bench/levers-4800", "use_rslora: true"],
        "bench_on_policy.yaml": ["chain_sum: 6000", "response_from: student", "after: selector k=1", "output: checkpoints/bench/on_policy"],
        "bench_unlabeled_srft.yaml": [
            "chain_sum: 6000",
            "demonstrations: cache",
            "fusion.stages.rewards.checked_or_agreement: 1.0",
            "mode: sft_only",
            "output: checkpoints/bench/unlabeled_srft",
        ],
        "bench_unlabeled_srft_weak.yaml": [
            "chain_sum: 6000",
            "run_pools:",
            "mode: rl_only",
            "output: checkpoints/bench/unlabeled_srft_weak",
        ],
        "bench_unaligned.yaml": ["pools:", "unaligned: marginal", "unaligned: gold_onehot"],
        "bench_unaligned_unlabeled.yaml": ["pools:", "unaligned: marginal", "unlabeled_size: 1000"],
        "bench_pool_c.yaml": [
            "run_pools:",
            "- B",
            "teacher:",
            "word_sorting-llama-bpe",
            "answer_from: fused",
            "selection_margin: 2.0",
            "demonstrations: cache",
        ],
        "srft.yaml": ["class_path: fusion.stages.srft.SRFTModule", "entropy_granularity:"],
    }.get(name, ["class_path: fusion.stages.fusion.FusionDistillModule", "fusion:"])  # no class_path: the default
    assert all(part in printed for part in expected)


def _last(run_dir: str, version: int) -> str:
    return os.path.join(run_dir, "run", f"version_{version}", "checkpoints", "last.ckpt")


@pytest.mark.slow
def test_fit_test_resume_export(write_config, tmp_path, monkeypatch):
    import fusion.sources.pool

    config = write_config(fusion="selector", top_k=2)
    runs = str(tmp_path / "runs")

    main(["fit", "--config", config])
    loaded = []
    load_frozen = fusion.sources.pool.load_frozen
    monkeypatch.setattr(fusion.sources.pool, "load_frozen", lambda *a, **k: loaded.append(a[0]) or load_frozen(*a, **k))
    checkpoint = torch.load(_last(runs, 0), map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 4
    keys = list(checkpoint["state_dict"])
    # Only the adapter and the selector are saved: no base weights, no sources.
    assert keys and all("lora_" in k or k.startswith("selector.") for k in keys), keys[:5]
    assert any(k.startswith("selector.") for k in keys)

    main(["test", "--config", config, "--ckpt_path", _last(runs, 0)])
    with open(os.path.join(runs, "run", "version_1", "metrics.json")) as f:
        metrics = json.load(f)
    # The test loop's numbers are those of the checkpoint's student, computed apart from Lightning.
    trained = FusionDistillModule.load_from_checkpoint(_last(runs, 0), weights_only=True)
    reference = reference_test_metrics(
        trained.student, trained.tokenizer, yaml.safe_load(open(config))["data"], trained.hparams.max_new_tokens
    )
    assert metrics["sequences"] == reference["sequences"] == {"spell_backward": 4, "chain_sum": 4}
    assert metrics["acc"] == reference["acc"] and metrics["acc_mean"] == pytest.approx(reference["acc_mean"])
    assert metrics["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-5)
    shares = metrics["selection_share"]
    assert set(shares) == {"spell", "sum", "noise"}
    assert sum(shares.values()) == pytest.approx(2.0)  # top_k = 2 sources per sequence
    assert loaded == []  # test loads no source: the selector's choices come from the student alone

    # Resume the 4-step run to 6 steps: the optimizer and step counter continue.
    main(["fit", "--config", config, "--trainer.max_steps", "6", "--ckpt_path", _last(runs, 0)])
    assert len(loaded) == 3  # fit runs them
    resumed = torch.load(_last(runs, 2), map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 6
    assert any(not torch.equal(resumed["state_dict"][k], checkpoint["state_dict"][k]) for k in keys)

    # Export: the merged plain HF model computes what the LoRA student computes.
    out = export.export(_last(runs, 2), str(tmp_path / "exported"))
    merged = AutoModelForCausalLM.from_pretrained(out)
    module = FusionDistillModule.load_from_checkpoint(_last(runs, 2), weights_only=True)
    assert len(loaded) == 3  # neither export nor load_from_checkpoint loaded a source
    ids = torch.tensor([[1, 40, 41, 42, 33]])
    with torch.no_grad():
        expected = module.student(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert torch.allclose(expected, got, atol=1e-4)
    assert os.path.isfile(os.path.join(out, "model.safetensors")) and os.path.isfile(os.path.join(out, "tokenizer.json"))
    # AutoTokenizer reads the character tokenizer of this Qwen2 student as Qwen2's own (no spaces);
    # alone in tokenizer/ it reads it as saved, with the same ids as fusion's loader.
    assert not export.auto_tokenizer_matches(out, load_tokenizer(out))
    assert export.auto_tokenizer_matches(os.path.join(out, "tokenizer"), load_tokenizer(out))


def _logged_steps(run_dir: str, version: int) -> list[dict[str, float]]:
    """The training steps' rows of a run's metrics.csv, as numbers (empty cells left out)."""
    with open(os.path.join(run_dir, "run", f"version_{version}", "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    return [{k: float(v) for k, v in row.items() if v != ""} for row in rows if row.get("train/loss")]


# Each baseline's mean source weights per step (weight/<source>, averaged over the batch's rows).
BASELINE_WEIGHTS = {
    "uniform": lambda w: w == pytest.approx({"spell": 1 / 3, "sum": 1 / 3, "noise": 1 / 3}),
    "single": lambda w: w == {"spell": 0.0, "sum": 1.0, "noise": 0.0},  # single_source: sum
    "oracle": lambda w: w["noise"] == 0.0 and w["spell"] + w["sum"] == pytest.approx(1.0),  # by domain, never the random source
    "avgce": lambda w: sum(w.values()) == pytest.approx(1.0) and min(w.values()) > 0.0,  # softmax(-CE): every source some
    "mince": lambda w: (
        sum(w.values()) == pytest.approx(1.0) and all(v * 8 == pytest.approx(round(v * 8)) for v in w.values())
    ),  # one source per row
    "confidence": lambda w: sum(w.values()) == pytest.approx(1.0) and min(w.values()) > 0.0,
}


@pytest.mark.slow
@pytest.mark.parametrize("fusion", ["none", "uniform", "avgce", "mince", "confidence", "single", "oracle"])
def test_every_baseline_trains(write_config, tmp_path, fusion):
    """Two steps of each baseline through the CLI: the adapter moves, and each step's logged source
    weights follow the method's rule (uniform thirds, the single source, the domain's specialist...)."""
    config = write_config(fusion=fusion, single_source="sum")
    main(["fit", "--config", config, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0"])
    checkpoint = torch.load(_last(str(tmp_path / "runs"), 0), map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2
    assert not any(k.startswith("selector.") for k in checkpoint["state_dict"])
    lora_b = [v for k, v in checkpoint["state_dict"].items() if "lora_B" in k]
    assert lora_b and max(float(v.abs().max()) for v in lora_b) > 0.0  # lora_B starts at 0: two steps moved it
    steps = _logged_steps(str(tmp_path / "runs"), 0)
    assert [int(s["step"]) for s in steps] == [0, 1]
    for step in steps:
        if fusion == "none":  # plain SFT: the loss is the gold CE, no source weighed
            assert step["train/loss"] == step["train/ce"] and not any(k.startswith("weight/") for k in step)
        else:
            weights = {name: step[f"weight/{name}"] for name in ("spell", "sum", "noise")}
            assert BASELINE_WEIGHTS[fusion](weights), weights
            assert step["train/source_skipped"] == 0.0


@pytest.mark.slow
def test_nonfinite_loss_stops_with_a_checkpoint(write_config, tmp_path, monkeypatch):
    """A non-finite training loss saves the last finite state and stops with a message."""
    from fusion.objectives import losses

    calls = {"n": 0}
    real = losses.student_loss

    def failing(*args, **kwargs):
        calls["n"] += 1
        terms = real(*args, **kwargs)
        return terms if calls["n"] < 3 else {**terms, "loss": terms["loss"] * float("nan")}

    monkeypatch.setattr(losses, "student_loss", failing)
    config = write_config(fusion="none")
    with pytest.raises(FloatingPointError, match=r"the training loss is nan at step 2 .*saved the last finite state to"):
        main(["fit", "--config", config, "--trainer.limit_val_batches", "0"])
    saved = os.path.join(str(tmp_path / "runs"), "run", "version_0", "checkpoints", "nonfinite.ckpt")
    checkpoint = torch.load(saved, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())


class NotATensor:
    """Any pickled object: a checkpoint holding one can run code when unpickled."""


@pytest.mark.slow
def test_pickle_bearing_checkpoint_is_refused(write_config, tmp_path):
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"payload": NotATensor()}}, evil)
    with pytest.raises(Exception, match="[Ww]eights only load failed|weights_only"):
        export.export(str(evil), str(tmp_path / "out"))
    config = write_config(fusion="none")
    with pytest.raises(Exception, match="[Ww]eights only load failed|weights_only"):
        main(["test", "--config", config, "--ckpt_path", str(evil)])


@pytest.mark.slow
def test_checkpoint_from_another_setup_is_refused(tiny_zoo, write_config, tmp_path):
    """The CLI rebuilds a checkpoint's own module from its hyperparameters; a module built
    otherwise (another adapter rank, no selector) refuses it, naming the keys."""
    main(["fit", "--config", write_config(fusion="selector"), "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"])
    checkpoint = torch.load(_last(str(tmp_path / "runs"), 0), map_location="cpu", weights_only=True)
    student = os.path.join(tiny_zoo, "student")
    other_rank = FusionDistillModule(student=student, fusion="none", lora={"r": 4, "lora_alpha": 8, "target_modules": "all-linear"})
    with pytest.raises(
        ValueError, match=r"the checkpoint was written for a different student, adapter or source list: .*wrong shape \['student"
    ):
        other_rank.on_load_checkpoint(checkpoint)
    no_selector = FusionDistillModule(student=student, fusion="none")
    with pytest.raises(ValueError, match=r"unexpected \['selector"):
        no_selector.on_load_checkpoint(checkpoint)


QUICKSTART = os.path.join(os.path.dirname(__file__), "..", "configs", "quickstart.yaml")


def _error_lines(run, capfd) -> list[str]:
    """The non-empty lines `python -m fusion.train` prints on stderr when it refuses its input (exit code 2)."""
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code == 2
    return [line for line in capfd.readouterr().err.splitlines() if line.strip()]


def test_a_refused_setting_is_the_first_and_last_line_printed(capfd):
    """The module's own message, not jsonargparse's Union noise or the config dump around it."""
    from fusion.train import command_line

    lines = _error_lines(lambda: command_line(["fit", "--config", QUICKSTART, "--model.lam", "2.0", "--trainer.max_steps", "1"]), capfd)
    assert lines[0] == lines[-1] == "error: model.lam must be in [0, 1], got 2.0"
    assert "Namespace(" not in "\n".join(lines) and "NoneType" not in "\n".join(lines)
    assert lines[-2] == "ValueError: model.lam must be in [0, 1], got 2.0"  # where it was raised, just above


def test_a_refused_argument_is_the_first_and_last_line_printed(capfd):
    from fusion.train import command_line

    lines = _error_lines(lambda: command_line(["fit", "--config", QUICKSTART, "--model.feedback_wieght", "0.1"]), capfd)
    assert lines[0] == lines[-1] == "error: model: Option 'feedback_wieght' is not accepted"
    assert "`python -m fusion.train fit --help` lists every option." in lines
    lines = _error_lines(lambda: command_line(["fit", "--config", QUICKSTART, "--model.lam", "abc"]), capfd)
    assert lines[0] == lines[-1] == "error: model.lam: Expected a <class 'float'>. Got value: abc"


def test_tensorboard_logger_without_tensorboard_names_the_extra(capfd, monkeypatch, tmp_path):
    """TensorBoard is an extra: a config that logs to it, where it is not installed, says what to install."""
    from fusion.train import command_line

    for name in ("tensorboard", "tensorboardX"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    logger = json.dumps({"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(tmp_path)}})
    lines = _error_lines(lambda: command_line(["fit", "--config", QUICKSTART, f"--trainer.logger={logger}"]), capfd)
    assert (
        lines[0]
        == lines[-1]
        == (
            "error: trainer.logger: TensorBoardLogger needs tensorboard, which is not installed: "
            "pip install 'fusion[tensorboard]' (or log with lightning.pytorch.loggers.CSVLogger)"
        )
    )
    assert os.listdir(tmp_path) == []  # refused before anything was built or written


def test_plots_without_matplotlib_name_the_extra(monkeypatch, tmp_path):
    """matplotlib is an extra: the benchmark report's plots, where it is not installed, say what to install."""
    from fusion.bench.srft import plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"^the benchmark plots need matplotlib, which is not installed: pip install 'fusion\[plots\]'$"):
        plot({"runs": []}, str(tmp_path))


def test_an_error_that_is_not_bad_input_keeps_its_traceback(monkeypatch):
    """A bug (here a TypeError) is not reported as bad input: it propagates as raised."""
    import fusion.train

    monkeypatch.setattr(fusion.train, "main", lambda *a, **k: None + 1)
    with pytest.raises(TypeError):
        fusion.train.command_line(["fit"])


@pytest.mark.slow
def test_the_command_prints_the_refused_setting_first_and_last():
    """The same through `python -m fusion.train`, as a user types it."""
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fusion.train",
            "fit",
            "--config",
            "configs/quickstart.yaml",
            "--model.lam",
            "2.0",
            "--trainer.max_steps",
            "1",
        ],
        cwd=os.path.join(os.path.dirname(__file__), ".."),
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and lines[0] == lines[-1] == "error: model.lam must be in [0, 1], got 2.0", result.stderr[-2000:]


@pytest.mark.slow
def test_unknown_config_key_fails(write_config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", write_config(), "--model.feedback_wieght", "0.1"])
    assert exit_info.value.code != 0
    assert "feedback_wieght" in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tiny_zoo, tmp_path):
    """SIGTERM mid-fit: Lightning stops at the next step, OnExceptionCheckpoint saves, exit code 0."""
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from tests.conftest import tiny_config

    runs = tmp_path / "runs"
    config = tiny_config(tiny_zoo, str(runs), fusion="none")
    config["trainer"]["max_steps"] = 100_000
    config["trainer"]["limit_val_batches"] = 0
    config["trainer"]["callbacks"] = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"save_last": True, "save_top_k": 0, "every_n_train_steps": 5},
        },
        {"class_path": "lightning.pytorch.callbacks.OnExceptionCheckpoint", "init_args": {"dirpath": str(runs)}},
    ]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    process = subprocess.Popen(
        [sys.executable, "-m", "fusion.train", "fit", "--config", str(path)], cwd=os.path.dirname(os.path.dirname(__file__))
    )
    last = runs / "run" / "version_0" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert last.exists(), "no checkpoint was written within 120 s"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    saved = torch.load(runs / "on_exception.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] >= 5
    assert all("lora_" in k for k in saved["state_dict"])


@pytest.mark.slow
def test_a_completed_fit_removes_its_stale_on_exception_checkpoint(tiny_zoo, tmp_path):
    """Lightning resumes a fit from an existing on_exception.ckpt on its own; once a fit completes,
    the file is removed, so the next run starts fresh instead of from an old interrupted state."""
    import yaml

    from tests.conftest import tiny_config

    config = tiny_config(tiny_zoo, str(tmp_path / "runs"), fusion="none")
    stale = tmp_path / "exceptions" / "on_exception.ckpt"
    config["trainer"]["callbacks"].append(
        {"class_path": "lightning.pytorch.callbacks.OnExceptionCheckpoint", "init_args": {"dirpath": str(stale.parent)}}
    )
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path), "--trainer.max_steps=2"])
    stale.parent.mkdir()
    os.replace(_last(str(tmp_path / "runs"), 0), stale)  # an interrupted run's state, 2 steps in
    main(["fit", "--config", str(path)])  # resumes from it on its own: steps 3 and 4
    assert torch.load(_last(str(tmp_path / "runs"), 1), map_location="cpu", weights_only=True)["global_step"] == 4
    assert not stale.exists()
    main(["fit", "--config", str(path)])  # a fresh run: 4 steps from step 0, not 0 steps from step 4
    assert [int(s["step"]) for s in _logged_steps(str(tmp_path / "runs"), 2)] == [0, 1, 2, 3]
    assert len(_logged_steps(str(tmp_path / "runs"), 1)) == 2  # the resumed one: steps 3 and 4 only


@pytest.mark.parametrize(
    "old_class, new_class, rewards_key",
    [
        ("fusion.module.FusionDistillModule", "fusion.stages.fusion.FusionDistillModule", "selector_rewards"),
        ("fusion.srft.SRFTModule", "fusion.stages.srft.SRFTModule", "rewards"),
    ],
)
def test_ckpt_path_from_before_the_relayout_reads_its_moved_class_and_rewards(tmp_path, old_class, new_class, rewards_key):
    """A checkpoint written before fusion/ was laid out by concern names its class and reward
    functions by the old module paths (`fusion.module`, `fusion.srft`, `fusion.rewards`); `--ckpt_path`
    reads them into the config under the new ones (`fusion.train.MOVED`)."""
    from fusion.train import FusionCLI
    from tests.conftest import tiny_config

    class Parsed(Exception):
        pass

    class ParseOnly(FusionCLI):
        def instantiate_classes(self) -> None:  # the checkpoint's hyperparameters are in the config by now
            raise Parsed(self.config.test.model)

    hparams = {
        "_class_path": old_class,
        "_instantiator": "lightning.pytorch.cli.instantiate_module",
        "student": "checkpoints/zoo/fusion.module",
        rewards_key: {"fusion.rewards.answer_format": 1.0},
    }
    torch.save({"state_dict": {}, "hyper_parameters": hparams}, tmp_path / "old.ckpt")
    config = tiny_config(str(tmp_path / "zoo"), str(tmp_path / "runs"))
    config["model"] = {"class_path": new_class, "init_args": {"student": "unused"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(Parsed) as parsed:
        main(["test", "--config", str(tmp_path / "config.yaml"), "--ckpt_path", str(tmp_path / "old.ckpt")], cli=ParseOnly)
    model = parsed.value.args[0]
    assert model.class_path == new_class
    assert model.init_args[rewards_key] == {"fusion.stages.rewards.answer_format": 1.0}
    assert model.init_args.student == "checkpoints/zoo/fusion.module"  # only dotted module paths are renamed
