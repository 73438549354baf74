"""Lightning callbacks that the configs name."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


class TorchThreads(L.Callback):
    """Set torch's intra-op threads when a run starts (`torch.set_num_threads`).

    Rollout sampling with a tiny model is many small, latency-bound operations: on a shared
    CPU, more threads than free cores makes them wait on each other (measured on this 2-core
    machine under load: about 1 s a step with one thread, 5-30 s with two).
    """

    def __init__(self, num_threads: int = 1):
        if num_threads < 1:
            raise ValueError(f"TorchThreads: num_threads must be at least 1, got {num_threads}")
        self.num_threads = num_threads

    def setup(self, trainer, pl_module, stage: str) -> None:
        torch.set_num_threads(self.num_threads)


class TrainingWatch(L.Callback):
    """Says when a run's training loss climbs far above where it started, and refuses a
    validation-monitored checkpoint without a validation split.

    The loss of the first `window` steps is the start; from then on an exponential moving
    average of the loss (over about `window` steps) is compared with it. Once the average passes
    `factor` times the start, it warns once and writes `diverged` (the step, the start and the
    average) into the run's record (`metrics.json`, the test results): the run goes on, and a
    `ModelCheckpoint` that monitors the validation split still returns its best checkpoint.
    """

    def __init__(self, window: int = 20, factor: float = 2.0):
        if window < 1 or factor <= 1.0:
            raise ValueError(f"TrainingWatch: window must be at least 1 and factor above 1, got {window} and {factor}")
        self.window, self.factor = window, factor
        self.first: list[float] = []
        self.average: float | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            check_validation_split(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None or not torch.isfinite(loss):
            return  # a non-finite loss stops the run elsewhere (stop_if_nonfinite)
        value = float(loss)
        if len(self.first) < self.window:
            self.first.append(value)
            self.average = sum(self.first) / len(self.first)
            return
        self.average += (value - self.average) * 2.0 / (self.window + 1)
        start = sum(self.first) / len(self.first)
        record = getattr(pl_module, "fit_record", None)
        if self.average > self.factor * start and record is not None and "diverged" not in record:
            record["diverged"] = {"step": trainer.global_step, "start_loss": start, "average_loss": self.average}
            rank_zero_warn(
                f"the training loss climbed from {start:.4g} (mean of the first {self.window} steps) to {self.average:.4g} "
                f"(moving average) by step {trainer.global_step}: the run is diverging (a learning rate or LoRA scale "
                "too high?); it goes on, and a ModelCheckpoint on the validation split keeps its best checkpoint"
            )

    def state_dict(self) -> dict:
        return {"first": self.first, "average": self.average}

    def load_state_dict(self, state_dict: dict) -> None:
        self.first, self.average = list(state_dict["first"]), state_dict["average"]


def validation_checkpoints(trainer) -> list:
    """The trainer's checkpoint callbacks that monitor a `val/` metric (OnExceptionCheckpoint has no monitor)."""
    return [c for c in trainer.checkpoint_callbacks if (getattr(c, "monitor", None) or "").startswith("val/")]


def check_validation_split(trainer) -> None:
    """A ModelCheckpoint that monitors a `val/` metric needs validation to run: a validation
    split with rows, and `trainer.limit_val_batches` above 0."""
    monitors = [c.monitor for c in validation_checkpoints(trainer)]
    if not monitors:
        return
    data = getattr(trainer, "datamodule", None)
    rows = data.load().get("val", []) if data is not None and hasattr(data, "load") else None
    if trainer.limit_val_batches == 0 or rows == []:
        raise ValueError(
            f"trainer.callbacks: ModelCheckpoint(monitor={monitors[0]!r}) keeps the checkpoint that does best on the "
            "validation split, and this run validates on nothing: give it a validation split (data.val_size, or a "
            "val file beside train in data.dataset) and leave trainer.limit_val_batches above 0, or drop `monitor`"
        )


def best_checkpoint(trainer) -> str | None:
    """After `fit`: the checkpoint that did best on the validation split, where a ModelCheckpoint
    monitors it; None otherwise (test the weights as they are)."""
    paths = [c.best_model_path for c in validation_checkpoints(trainer) if c.best_model_path]
    return paths[0] if paths else None


class StartCheckpoint(L.Callback):
    """Enters the student as it starts (step 0) among the candidates of the ModelCheckpoint that
    monitors the validation split, so that the checkpoint a run keeps is never worse on
    validation than the student it started from: SFT on a few answers that only overfits them
    returns its untrained adapter (for LoRA, the base model itself).

    Before the first step it runs the validation split through the module's own evaluation
    (`validation_step`, then `eval_metrics`), saves a checkpoint as that callback would (its
    `save_weights_only`) under its own file name (e.g. `best.ckpt`) and makes it the callback's
    best (its public `best_model_path`, `best_model_score`, `best_k_models`, `kth_best_model_path`,
    `kth_value`): a later validation that does better replaces it as usual. A resumed run (past step 0) does nothing.
    """

    def on_train_start(self, trainer, pl_module) -> None:
        monitored = validation_checkpoints(trainer)
        if not monitored or trainer.global_step > 0:
            return
        check_validation_split(trainer)
        checkpoint = monitored[0]
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            for index, batch in enumerate(trainer.datamodule.val_dataloader()):
                pl_module.validation_step(trainer.strategy.batch_to_device(batch), index)
        results = pl_module.eval_metrics.compute()
        pl_module.eval_metrics.reset()
        pl_module.train(was_training)
        score = torch.tensor(float(results[checkpoint.monitor.removeprefix("val/")]))
        path = checkpoint.format_checkpoint_name({checkpoint.monitor: score, "step": torch.tensor(0), "epoch": torch.tensor(0)})
        # The same kind of file as the callback's own saves (Lightning logs a notice when this is left unset).
        trainer.save_checkpoint(path, weights_only=checkpoint.save_weights_only)
        checkpoint.best_k_models = {path: score}
        checkpoint.best_model_path = checkpoint.kth_best_model_path = path
        checkpoint.best_model_score = checkpoint.kth_value = score
        rank_zero_info(
            f"StartCheckpoint: the student before training scores {checkpoint.monitor} = {float(score):.4f}; "
            f"{path} is the checkpoint to beat"
        )
