"""The student against its sources: the ratio to the best source, the floor of the untrained
student, the run that diverges, and validation-monitored checkpoints (hand values, no models)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fusion.bench import _quality_report as report_lib
from fusion.stages.evaluation import best_sources, ratio_to_sources
from fusion.utils.callbacks import TrainingWatch, best_checkpoint, check_validation_split


def test_best_sources_and_ratio_by_hand():
    sources = {"a": {"d1": 0.8, "d2": 0.0, "d3": 0.0}, "b": {"d1": 0.4, "d2": 0.5, "d3": 0.0}, "c": {"d1": 0.8, "d2": 0.25, "d3": 0.0}}
    best = best_sources(sources)
    assert best == {"d1": ("a", 0.8), "d2": ("b", 0.5), "d3": ("a", 0.0)}  # a tie goes to the first listed
    ceiling = {d: v for d, (_, v) in best.items()}
    result = ratio_to_sources({"d1": 0.6, "d2": 0.55, "d3": 0.1}, ceiling)
    # d3: no source answers it at all, so it has no ratio (and nothing is divided by zero).
    assert result["ratio"] == {"d1": pytest.approx(0.75), "d2": pytest.approx(1.1), "d3": None}
    assert result["ratio_mean"] == pytest.approx((0.75 + 1.1) / 2) and result["ratio_min"] == pytest.approx(0.75)
    assert result["undefined"] == ["d3"]
    nothing = ratio_to_sources({"d3": 0.2}, {"d3": 0.0})
    assert nothing == {"ratio": {"d3": None}, "ratio_mean": None, "ratio_min": None, "undefined": ["d3"]}
    assert ratio_to_sources({"d1": 0.3}, {"d1": 0.04}, floor=0.05)["ratio"] == {"d1": None}  # below the floor: chance


def _run(method, pool, seed, acc):
    return {"method": method, "pool": pool, "seed": seed, "acc": acc, "acc_mean": sum(acc.values()) / len(acc)}


def test_report_ratios_floor_and_table(tmp_path):
    runs = [
        _run("selector", "A", 0, {"d1": 0.4, "d2": 0.5}),
        _run("selector", "A", 1, {"d1": 0.6, "d2": 0.5}),
        _run("selector", "B", 0, {"d1": 0.2, "d2": 0.5}),
        _run("base", "A", 0, {"d1": 0.3, "d2": 0.3}),
    ]
    methods = {
        "selector": {"fusion": "selector", "source_forwards_per_seq": {"A": 1, "B": 1}},
        "base": {"fusion": None, "source_forwards_per_seq": {"A": 0, "B": 0}},
    }
    summary = report_lib.summarize(runs, methods)
    sources = {"s1": {"d1": 0.8, "d2": 0.0}, "s2": {"d1": 0.0, "d2": 1.0}, "liar": {"d1": 0.0, "d2": 0.0}}
    best = report_lib.add_ratios(summary, runs, sources, {"A": ["s1", "s2"], "B": ["s1", "s2", "liar"]})
    assert best == {"A": {"d1": ["s1", 0.8], "d2": ["s2", 1.0]}, "B": {"d1": ["s1", 0.8], "d2": ["s2", 1.0]}}
    a = summary["selector"]["A"]
    assert a["ratio"] == {"d1": pytest.approx(0.625), "d2": pytest.approx(0.5)}  # from the seed means 0.5 and 0.5
    # Per seed: seed 0 ratios (0.5, 0.5), seed 1 (0.75, 0.5): mean ratio 0.5 and 0.625, worst 0.5 and 0.5.
    assert a["ratio_mean"] == pytest.approx(0.5625) and a["ratio_mean_std"] == pytest.approx(0.125 / 2**0.5)
    assert a["ratio_min"] == pytest.approx(0.5) and a["ratio_min_std"] == pytest.approx(0.0)
    assert summary["selector"]["B"]["ratio_min"] == pytest.approx(0.25)
    floor = report_lib.criteria_floor(summary, "base")
    assert floor["selector"]["at_least_untrained_student"]["A"]["pass"]  # 0.5 >= 0.3
    assert floor["selector"]["at_least_untrained_student"]["B"]["pass"]  # 0.35 >= 0.3
    assert floor["selector"]["at_least_untrained_student"]["B"]["method"] == pytest.approx(0.35)
    below = report_lib.criteria_floor(
        report_lib.summarize(
            runs + [_run("none", "A", 0, {"d1": 0.1, "d2": 0.3})],
            methods | {"none": {"fusion": "none", "source_forwards_per_seq": {"A": 0, "B": 0}}},
        ),
        "base",
    )
    assert not below["none"]["at_least_untrained_student"]["A"]["pass"]  # 0.2 < 0.3: reported, not hidden
    ratio = report_lib.criteria_ratio(summary, methods)["selector"]
    assert not ratio["mean_ratio_at_least_0.85"]["A"]["pass"] and ratio["mean_ratio_at_least_0.85"]["A"]["ratio_mean"] == pytest.approx(
        0.5625
    )
    assert ratio["worst_ratio_at_least_0.5"]["A"]["pass"] and not ratio["worst_ratio_at_least_0.5"]["B"]["pass"]  # 0.5; 0.25
    merged = report_lib.merge_criteria({"selector": {"x": 1}}, {"selector": ratio}, floor)
    assert set(merged["selector"]) == {"x", "mean_ratio_at_least_0.85", "worst_ratio_at_least_0.5", "at_least_untrained_student"}
    report = {
        "quick": True,
        "seeds": [0, 1],
        "results": summary,
        "criteria": floor,
        "consistency": None,
        "runtime_seconds": 1.0,
        "sources": sources,
        "best_source": best,
    }
    text = report_lib.markdown(report, "")
    assert "| s1 | 0.80 | 0.00 | A, B |" in text and "| liar | 0.00 | 0.00 | - |" in text
    assert "| selector | A | 0.62 | 0.50 | 0.56 ± 0.09 | 0.50 ± 0.00 |" in text


def _watch_losses(losses, window=3, factor=2.0):
    watch, module = TrainingWatch(window=window, factor=factor), SimpleNamespace(fit_record={})
    with pytest.warns(UserWarning) if max(losses) > 10 else _no_warning():
        for step, loss in enumerate(losses):
            watch.on_train_batch_end(SimpleNamespace(global_step=step + 1), module, {"loss": torch.tensor(loss)}, None, step)
    return module.fit_record


class _no_warning:
    def __enter__(self):
        import warnings

        self.catcher = warnings.catch_warnings()
        self.catcher.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        self.catcher.__exit__(*exc)


def test_training_watch_says_when_the_loss_climbs():
    assert _watch_losses([1.0, 1.0, 1.0] + [0.9] * 20) == {}  # learning: nothing to say
    assert _watch_losses([1.0, 1.0, 1.0] + [1.9] * 20) == {}  # worse, but never past twice the start
    record = _watch_losses([1.0, 1.0, 1.0] + [20.0] * 5)
    # Start 1.0; the moving average (alpha = 2 / (3 + 1) = 0.5) reads 10.5 after the first 20.0, at step 4.
    assert record["diverged"] == {"step": 4, "start_loss": pytest.approx(1.0), "average_loss": pytest.approx(10.5)}
    with pytest.raises(ValueError, match="factor above 1"):
        TrainingWatch(factor=1.0)


def test_validation_monitored_checkpoint_needs_a_validation_split():
    monitored = SimpleNamespace(monitor="val/acc_mean", best_model_path="runs/best.ckpt")
    last = SimpleNamespace(monitor=None, best_model_path="")
    on_exception = SimpleNamespace()  # Lightning's OnExceptionCheckpoint: a checkpoint callback with no monitor at all
    data = SimpleNamespace(load=lambda: {"val": [{"prompt": "p"}]})
    check_validation_split(SimpleNamespace(checkpoint_callbacks=[on_exception, last, monitored], limit_val_batches=1.0, datamodule=data))
    for trainer in (
        SimpleNamespace(checkpoint_callbacks=[monitored], limit_val_batches=0, datamodule=data),
        SimpleNamespace(checkpoint_callbacks=[monitored], limit_val_batches=1.0, datamodule=SimpleNamespace(load=lambda: {"val": []})),
    ):
        with pytest.raises(ValueError, match=r"monitor='val/acc_mean'.*data.val_size.*trainer.limit_val_batches"):
            check_validation_split(trainer)
    check_validation_split(SimpleNamespace(checkpoint_callbacks=[last], limit_val_batches=0, datamodule=data))  # nothing monitored
    assert best_checkpoint(SimpleNamespace(checkpoint_callbacks=[on_exception, last, monitored])) == "runs/best.ckpt"
    assert best_checkpoint(SimpleNamespace(checkpoint_callbacks=[last])) is None


def test_checkpoints_are_saved_and_loaded_with_weights_only_set(tmp_path):
    """The bench's path through Lightning (fit with StartCheckpoint and a validation-monitored
    ModelCheckpoint, test from the best checkpoint, the adapter saved for a chained stage) on a
    one-layer module: every save and load says `weights_only`, so Lightning never logs that it
    defaulted it, and the step-0 checkpoint loads with `torch.load(weights_only=True)`."""
    import logging

    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from fusion.utils.callbacks import StartCheckpoint

    class Scores:
        def compute(self):
            return {"acc_mean": 0.5}

        def reset(self):
            pass

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer, self.eval_metrics = torch.nn.Linear(2, 1), Scores()

        def training_step(self, batch, index):
            return self.layer(batch).pow(2).mean()

        def validation_step(self, batch, index):
            self.log("val/acc_mean", 0.5)

        def test_step(self, batch, index):
            self.log("test/loss", self.layer(batch).pow(2).mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Data(L.LightningDataModule):
        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.randn(8, 2), batch_size=4)

        val_dataloader = test_dataloader = train_dataloader

    notices = []
    catcher = logging.Handler(logging.DEBUG)
    catcher.emit = notices.append
    lightning_loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    for logger in lightning_loggers:
        logger.addHandler(catcher)
    try:
        checkpoint = ModelCheckpoint(monitor="val/acc_mean", mode="max", filename="best")
        trainer = L.Trainer(
            max_steps=2,
            default_root_dir=str(tmp_path),
            logger=False,
            accelerator="cpu",
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[checkpoint, StartCheckpoint()],
        )
        module = Tiny()
        trainer.fit(module, datamodule=Data())
        start = torch.load(checkpoint.best_model_path, weights_only=True)
        assert start["global_step"] == 0 and "state_dict" in start
        trainer.test(module, datamodule=Data(), verbose=False, ckpt_path=best_checkpoint(trainer), weights_only=True)
        trainer.save_checkpoint(str(tmp_path / "adapter.ckpt"), weights_only=True)
    finally:
        for logger in lightning_loggers:
            logger.removeHandler(catcher)
    assert [r.getMessage() for r in notices if "weights_only" in r.getMessage()] == []


def test_learning_curves_from_validation_logs(tmp_path):
    """Ratio on the validation split at each validation step, from the runs' metrics.csv, mean over seeds."""
    logs = []
    for seed, (first, last) in enumerate([(0.2, 0.4), (0.4, 0.8)]):
        log_dir = tmp_path / f"seed{seed}"
        log_dir.mkdir()
        (log_dir / "metrics.csv").write_text(
            "epoch,step,train/loss,val/acc_mean,val/acc_d1,val/acc_d2\n"
            f"0,9,1.0,,,\n0,199,,{(first + 0.5) / 2},{first},0.5\n0,399,,{(last + 0.5) / 2},{last},0.5\n"
        )
        logs.append({"method": "m", "pool": "A", "seed": seed, "log_dir": str(log_dir)})
    curves = report_lib.learning_curves(logs, {"s1": {"d1": 0.8, "d2": 0.0}, "s2": {"d1": 0.0, "d2": 0.5}}, {"A": ["s1", "s2"]})
    # Step 200: d1 ratios 0.25 and 0.5, d2 1.0: mean ratios 0.625 and 0.75, worst 0.25 and 0.5.
    assert curves["m"]["A"] == [[200, pytest.approx(0.6875), pytest.approx(0.375)], [400, pytest.approx(0.875), pytest.approx(0.75)]]
    assert "| m | A | 0.69 (0.38) | 0.88 (0.75) |" in "\n".join(report_lib.curve_table(curves))


def test_unlabeled_prompts_per_domain():
    from fusion.data import tasks

    splits = tasks.build_splits(["spell_backward", "chain_sum"], {"test": 3, "unlabeled": {"chain_sum": 5}}, 0)
    assert [r["domain"] for r in splits["unlabeled"]] == ["chain_sum"] * 5
    same = tasks.build_splits(["spell_backward", "chain_sum"], {"test": 3, "unlabeled": 5}, 0)
    assert splits["test"] == same["test"] and splits["unlabeled"] == same["unlabeled"][5:]  # a domain's draws do not depend on the others'


def test_sequence_nll_and_curriculum_weights_by_hand():
    from fusion.objectives.curriculum import DomainCurriculum, sequence_nll

    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]]))  # [1, 3, 3]
    targets = torch.tensor([[0, -100, 2]])  # the middle position is untrained
    assert sequence_nll(logits, targets, chunk_size=1).tolist() == pytest.approx([-torch.log(torch.tensor(0.5 * 0.6)).item()])

    curriculum = DomainCurriculum(["a", "b", "c"], floor=0.4, momentum=0.5)
    assert curriculum.weights().tolist() == pytest.approx([1 / 3] * 3)  # nothing observed yet
    ln = lambda p: -torch.log(torch.tensor(p))  # noqa: E731 (a probability as a sequence NLL)
    # a: the sources give its rows' responses 0.9 and 0.8, the student 0.1 and 0.6: gaps 0.8 and 0.2.
    # b: the student is more sure than the sources (0.5 against 0.3): gap clamped at 0. c: not seen.
    curriculum.update(["a", "a", "b"], torch.stack([ln(0.1), ln(0.6), ln(0.5)]), torch.stack([ln(0.9), ln(0.8), ln(0.3)]))
    assert curriculum.gap == [pytest.approx(0.5), pytest.approx(0.0), None]
    # c counts as the largest observed gap (0.5): w = 0.4 / 3 + 0.6 * (0.5, 0, 0.5) / 1.
    assert curriculum.weights().tolist() == pytest.approx([0.4 / 3 + 0.3, 0.4 / 3, 0.4 / 3 + 0.3])
    curriculum.update(["a", "c"], torch.stack([ln(1.0), ln(0.7)]), torch.stack([ln(1.0), ln(0.9)]))
    assert curriculum.gap == [pytest.approx(0.25), pytest.approx(0.0), pytest.approx(0.2)]  # a: 0.5 * 0.5 + 0.5 * 0
    restored = DomainCurriculum(["a", "b", "c"], floor=0.4, momentum=0.5)
    restored.load_state_dict(curriculum.state_dict())
    assert restored.weights().tolist() == curriculum.weights().tolist()
    with pytest.raises(ValueError, match="curriculum is over the domains"):
        DomainCurriculum(["a"]).load_state_dict(curriculum.state_dict())
    with pytest.raises(ValueError, match="curriculum_floor"):
        DomainCurriculum(["a"], floor=0.0)


def test_weighted_domain_sampler_draws_by_the_current_weights_and_resumes():
    from fusion.utils.resume import WeightedDomainSampler

    domains = [0] * 50 + [1] * 50
    weights = {"now": [0.9, 0.1]}
    sampler = WeightedDomainSampler(list(range(100)), domains, 2, lambda: weights["now"], num_replicas=1, rank=0, seed=3)
    drawn = list(sampler)
    assert len(drawn) == 100 and sum(i < 50 for i in drawn) > 80  # about 90 of the 100 from domain 0
    weights["now"] = [0.0, 1.0]
    assert all(i >= 50 for i in sampler)  # the weights at the time of each draw
    weights["now"] = [0.9, 0.1]
    sampler.start = 40  # a resumed epoch: the draws from position 40 on, as the uninterrupted epoch made them
    assert list(sampler) == drawn[40:]


@pytest.mark.slow
def test_fit_keeps_the_best_validation_checkpoint_with_a_curriculum(tiny_zoo, tmp_path):
    """Through fusion.train: validation every 2 steps, the best of them tested (its step in the
    run's record), and the curriculum's weights logged at every step, summing to 1."""
    import csv
    import json
    import os

    from fusion.train import main

    from .conftest import tiny_config

    config = tiny_config(tiny_zoo, str(tmp_path), curriculum_floor=0.5)
    config["trainer"]["max_steps"] = 6
    config["trainer"]["callbacks"] = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"monitor": "val/acc_mean", "mode": "max", "filename": "best"},
        },
        {"class_path": "fusion.utils.callbacks.TrainingWatch", "init_args": {"window": 2}},
    ]
    run = main(["--config", json.dumps(config)], run=False)
    run.trainer.fit(run.model, datamodule=run.datamodule)
    callback = run.trainer.checkpoint_callback
    best_step = torch.load(callback.best_model_path, weights_only=True)["global_step"]
    assert best_checkpoint(run.trainer) == callback.best_model_path and best_step in (2, 4, 6)
    run.trainer.test(run.model, datamodule=run.datamodule, verbose=False, ckpt_path=best_checkpoint(run.trainer), weights_only=True)
    assert run.model.test_results["checkpoint_step"] == best_step
    with open(os.path.join(run.trainer.log_dir, "metrics.json")) as f:
        assert json.load(f)["checkpoint_step"] == best_step
    with open(os.path.join(run.trainer.log_dir, "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("curriculum/chain_sum")]
    assert len(rows) == 6
    assert all(float(r["curriculum/chain_sum"]) + float(r["curriculum/spell_backward"]) == pytest.approx(1.0) for r in rows)
    assert all(min(float(r["curriculum/chain_sum"]), float(r["curriculum/spell_backward"])) >= 0.25 - 1e-6 for r in rows)  # floor / D
    assert run.model.curriculum.gap[0] is not None and run.model.curriculum.gap[1] is not None


@pytest.mark.slow
def test_start_checkpoint_is_kept_when_training_only_hurts(tiny_zoo, tmp_path):
    """With StartCheckpoint, a run whose validation never beats the student it started from keeps
    that student: the tested checkpoint is step 0's, and it scores exactly the untrained student."""
    import json

    from fusion.train import main

    from .conftest import tiny_config

    config = tiny_config(tiny_zoo, str(tmp_path), fusion="none", learning_rate=50.0)  # a rate that can only hurt
    config["trainer"]["callbacks"] = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"monitor": "val/acc_mean", "mode": "max", "filename": "best"},
        },
        {"class_path": "fusion.utils.callbacks.StartCheckpoint"},
    ]
    run = main(["--config", json.dumps(config)], run=False)
    run.trainer.fit(run.model, datamodule=run.datamodule)
    start = run.trainer.checkpoint_callback.best_model_path
    assert start.endswith("best.ckpt") and torch.load(start, weights_only=True)["global_step"] == 0
    run.trainer.test(run.model, datamodule=run.datamodule, verbose=False, ckpt_path=best_checkpoint(run.trainer), weights_only=True)
    trained = run.model.test_results
    untrained = main(["--config", json.dumps(tiny_config(tiny_zoo, str(tmp_path / "base"), fusion="none"))], run=False)
    untrained.trainer.test(untrained.model, datamodule=untrained.datamodule, verbose=False)
    assert trained["checkpoint_step"] == 0 and trained["acc"] == untrained.model.test_results["acc"]
    assert trained["perplexity"] == pytest.approx(untrained.model.test_results["perplexity"])


@pytest.mark.slow
def test_monitored_checkpoint_without_validation_names_the_setting(tiny_zoo, tmp_path):
    import json

    from fusion.train import main

    from .conftest import tiny_config

    config = tiny_config(tiny_zoo, str(tmp_path))
    config["trainer"]["limit_val_batches"] = 0
    config["trainer"]["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"monitor": "val/acc_mean", "mode": "max"}},
        {"class_path": "fusion.utils.callbacks.TrainingWatch"},
    ]
    run = main(["--config", json.dumps(config)], run=False)
    with pytest.raises(ValueError, match="data.val_size"):
        run.trainer.fit(run.model, datamodule=run.datamodule)


def test_report_only_takes_stored_runs_and_names_a_missing_one(tmp_path):
    import json

    from fusion.bench import quality

    stored = tmp_path / "result.json"
    stored.write_text(json.dumps({"config_hash": "from older code", "result": {"acc_mean": 0.5}}))
    jobs = [{"result_path": str(stored), "config_hash": "now", "cost": 1.0}]
    assert quality._run_all(jobs, workers=1, stored_only=True) == [{"acc_mean": 0.5, "reused": True}]
    with pytest.raises(FileNotFoundError, match="--report_only: no stored run at .*missing"):
        quality._run_all([{"result_path": str(tmp_path / "missing" / "result.json"), "config_hash": "x", "cost": 1.0}], 1, True)
