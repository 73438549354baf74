"""The command line: `python -m fusion.train {fit,validate,test,predict} --config configs/X.yaml`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

import datasets
import lightning as L
from lightning.pytorch.cli import LightningCLI
from transformers.utils.logging import disable_progress_bar

from fusion.data.datamodule import FusionDataModule
from fusion.stages.fusion import FusionDistillModule
from fusion.stages.srft import SRFTModule  # noqa: F401  (imported so that its class_path resolves)
from fusion.utils.optional import require_tensorboard

DEFAULT_MODEL = f"{FusionDistillModule.__module__}.{FusionDistillModule.__name__}"
PACKAGE = os.path.dirname(os.path.abspath(__file__))
# What fusion raises for bad input (config, data, checkpoints, caches) or a run it stops.
USER_ERRORS = (ValueError, OSError, FloatingPointError, RuntimeError, ImportError)
EXIT_BAD_INPUT = 2
# Checkpoints written before fusion/ was laid out by concern (data/, sources/, objectives/,
# stages/, utils/) name their class (`_class_path`: fusion.module.FusionDistillModule,
# fusion.srft.SRFTModule) and reward functions (the keys of `rewards`, `selector_rewards`:
# fusion.rewards.*) by the old module paths. `--ckpt_path` reads those hyperparameters into the
# config, where they must import (`FusionCLI._parse_ckpt_path`), so they are renamed first.
# `model.init_from` and `fusion.export` read only tensors and plain settings: no renaming there.
MOVED = {"fusion.module.": "fusion.stages.fusion.", "fusion.srft.": "fusion.stages.srft.", "fusion.rewards.": "fusion.stages.rewards."}


def renamed(value):
    """`value` (a checkpoint's hyperparameters) with every string that starts with a moved
    module's dotted path, dictionary keys included, pointed at the module's new path."""
    if isinstance(value, str):
        for old, new in MOVED.items():
            if value.startswith(old):
                return new + value[len(old) :]
        return value
    if isinstance(value, dict):
        return {renamed(k): renamed(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(renamed(v) for v in value)
    return value


class FusionCLI(LightningCLI):
    """One CLI for every stage. The model is any LightningModule named by `model.class_path`
    (subclass mode); without one it is `FusionDistillModule`, so the fusion configs and
    overrides like `--model.fusion=none` read as before, while `configs/srft.yaml` names
    `fusion.stages.srft.SRFTModule`. A checkpoint records its class, so `test --ckpt_path` rebuilds it."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"model": {"class_path": DEFAULT_MODEL}})
        # The data is tokenized with the student's tokenizer (every stage has `student`).
        parser.link_arguments("model.init_args.student", "data.tokenizer")

    def _parse_ckpt_path(self) -> None:
        # Lightning reads `--ckpt_path`'s hyperparameters into the config with `parser.parse_object`;
        # for this call only, that parse sees them with the old module paths renamed (`MOVED`).
        parse_object = self.parser.parse_object
        self.parser.parse_object = lambda cfg, *args, **kwargs: parse_object(renamed(cfg), *args, **kwargs)
        try:
            super()._parse_ckpt_path()
        finally:
            del self.parser.parse_object

    def instantiate_classes(self) -> None:
        # An optional dependency a configured class needs is named before anything is built.
        config = self.config[self.subcommand] if self.subcommand else self.config
        loggers = config.get("trainer.logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if str(getattr(logger, "class_path", "")).endswith("TensorBoardLogger"):
                require_tensorboard("trainer.logger")
        super().instantiate_classes()

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        _release_held_logs()


def main(args=None, run: bool = True, exit_on_error: bool = True, cli: type[FusionCLI] = FusionCLI) -> FusionCLI:
    """Parse `args` (default: the command line) and run the subcommand; exceptions propagate as
    raised (see `command_line` for the command's error report). `exit_on_error=False`: a bad
    argument raises an ArgumentError instead of printing the usage and exiting. `cli`: a subclass
    of `FusionCLI`, for tools that parse a command as `fusion.train` does (`fusion.eval_harness`)."""
    disable_progress_bar()  # per-file weight-loading bars of transformers; Lightning shows progress
    datasets.disable_progress_bars()  # and the per-split bars of datasets (data files, cache shards)
    return cli(
        L.LightningModule,
        FusionDataModule,
        subclass_mode_model=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": exit_on_error},
        args=args,
        run=run,
    )


def command_line(args=None) -> FusionCLI:
    """`python -m fusion.train`: `main`, with bad input reported as its one message, printed
    first and last on stderr (what went wrong in between), and exit code 2.

    Bad input is an argument the parser refuses, or an error fusion raises on purpose (a
    ValueError, OSError (a missing file, a model that cannot load), FloatingPointError, RuntimeError or ImportError raised in the
    fusion package: a config key out of range, a missing file, a refused cache, a non-finite loss,
    a missing optional dependency), even when jsonargparse or Lightning caught it and raised their
    own error about it. Anything else propagates with its traceback.
    """
    argv = sys.argv[1:] if args is None else list(args)
    held = _HeldLogs()
    logging.getLogger(SEED_LOGGER).addFilter(held)  # "Seed set to 0" waits until the config is valid
    try:
        return main(args, exit_on_error=False)
    except argparse.ArgumentError as error:
        details = str(error)
        command = "python -m fusion.train" + (f" {argv[0]}" if argv and not str(argv[0]).startswith("-") else "")
        _report(_headline(details), f"{details}\n\n`{command} --help` lists every option.")
    except USER_ERRORS as error:
        cause = fusion_error(error)
        if cause is None:
            raise
        _report(str(cause).strip(), "".join(traceback.format_exception(cause, chain=False)).rstrip())
    finally:
        logging.getLogger(SEED_LOGGER).removeFilter(held)
    raise SystemExit(EXIT_BAD_INPUT)


SEED_LOGGER = "lightning.fabric.utilities.seed"


class _HeldLogs(logging.Filter):
    """Holds a logger's records back: Lightning logs the seed it sets before the classes of the
    config are built, so a config error would come second. Released once they are built."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False


def _release_held_logs() -> None:
    logger = logging.getLogger(SEED_LOGGER)
    for held in [f for f in logger.filters if isinstance(f, _HeldLogs)]:
        logger.removeFilter(held)
        for record in held.records:
            logger.handle(record)


def fusion_error(error: BaseException) -> BaseException | None:
    """The error fusion raised that `error` is about: `error` itself, what it was raised from,
    or one of the errors jsonargparse collected when the value matched none of a Union's types
    (a config's `model` is `LightningModule | None`, so a module that refuses its settings is
    reported as a type mismatch); the first whose raise statement is in the fusion package."""
    seen, queue = set(), [error]
    while queue:
        current = queue.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, USER_ERRORS) and _raised_in_package(current):
            return current
        queue += [linked for linked in (current.__cause__, current.__context__) if linked is not None]
        frame = current.__traceback__
        while frame is not None:  # jsonargparse keeps the Union's errors in a local list only
            collected = frame.tb_frame.f_locals.get("exceptions")
            if isinstance(collected, list):
                queue += [e for e in collected if isinstance(e, BaseException)]
            frame = frame.tb_next
    return None


def _raised_in_package(error: BaseException) -> bool:
    frame = error.__traceback__
    if frame is None:
        return False
    while frame.tb_next is not None:
        frame = frame.tb_next
    return os.path.abspath(frame.tb_frame.f_code.co_filename).startswith(PACKAGE + os.sep)


# jsonargparse's lines around the one that says what is wrong: a config's `model` is a Union
# (None or a LightningModule), so every error there comes wrapped in these.
_UNION_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "- Expected a <class 'NoneType'>",
    "Given value type:",
    "Given value:",
)


def _headline(message: str) -> str:
    """One line of a parser error: the keys it is under, dotted, and its innermost complaint."""
    keys, complaint = [], ""
    for line in message.splitlines():
        text = line.strip()
        if not text or text.startswith(_UNION_NOISE):
            continue
        if text.startswith('Parser key "') and text.endswith('":'):
            keys.append(text[len('Parser key "') : -2])
            continue
        complaint = text.removeprefix("- ")
    prefix = ".".join(keys)
    return f"{prefix}: {complaint}" if prefix and complaint else complaint or message.strip()


def _report(message: str, details: str) -> None:
    line = f"error: {message}"
    sys.stderr.write(f"{line}\n\n{details}\n\n{line}\n")
    sys.stderr.flush()


if __name__ == "__main__":
    command_line()
