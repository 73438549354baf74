"""The command line: `python -m fusion.train {fit,validate,test,predict} --config configs/X.yaml`."""

from __future__ import annotations

import datasets
from lightning.pytorch.cli import LightningCLI
from transformers.utils.logging import disable_progress_bar

from fusion.data import FusionDataModule
from fusion.module import FusionDistillModule


class FusionCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The data is tokenized with the student's tokenizer.
        parser.link_arguments("model.student", "data.tokenizer")


def main(args=None, run: bool = True) -> FusionCLI:
    disable_progress_bar()  # per-file weight-loading bars of transformers; Lightning shows progress
    datasets.disable_progress_bars()  # and the per-split bars of datasets (data files, cache shards)
    return FusionCLI(
        FusionDistillModule,
        FusionDataModule,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
