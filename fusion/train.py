"""The command line: `python -m fusion.train {fit,validate,test,predict} --config configs/X.yaml`."""

from __future__ import annotations

import datasets
import lightning as L
from lightning.pytorch.cli import LightningCLI
from transformers.utils.logging import disable_progress_bar

from fusion.data import FusionDataModule
from fusion.module import FusionDistillModule
from fusion.srft import SRFTModule  # noqa: F401  (imported so that its class_path resolves)

DEFAULT_MODEL = f"{FusionDistillModule.__module__}.{FusionDistillModule.__name__}"


class FusionCLI(LightningCLI):
    """One CLI for every stage. The model is any LightningModule named by `model.class_path`
    (subclass mode); without one it is `FusionDistillModule`, so the fusion configs and
    overrides like `--model.fusion=none` read as before, while `configs/srft.yaml` names
    `fusion.srft.SRFTModule`. A checkpoint records its class, so `test --ckpt_path` rebuilds it."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"model": {"class_path": DEFAULT_MODEL}})
        # The data is tokenized with the student's tokenizer (every stage has `student`).
        parser.link_arguments("model.init_args.student", "data.tokenizer")


def main(args=None, run: bool = True, cli: type[FusionCLI] = FusionCLI) -> FusionCLI:
    """Parse `args` (default: the command line) and run the subcommand. `cli`: a subclass of
    `FusionCLI`, for tools that parse a command as `fusion.train` does (`fusion.eval_harness`)."""
    disable_progress_bar()  # per-file weight-loading bars of transformers; Lightning shows progress
    datasets.disable_progress_bars()  # and the per-split bars of datasets (data files, cache shards)
    return cli(
        L.LightningModule,
        FusionDataModule,
        subclass_mode_model=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
