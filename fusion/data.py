"""Data: the embedded task suite or any local JSONL/Parquet file or `datasets` name, tokenized
for distillation (loss on response tokens only) and for greedy evaluation (left-padded prompts).
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from fusion import tasks
from fusion.resume import ResumableLoader, run_seed
from fusion.tokenizer import load_tokenizer

IGNORE_INDEX = -100
SPLITS = ("train", "val", "test")
_EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def encode(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_length: int) -> dict[str, Any]:
    """`[bos] prompt response [eos]`; labels only on response and eos. Long prompts lose their start."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt_ids = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    response_ids = response_ids[: max_length - 1]
    keep = max_length - len(response_ids)
    truncated = len(prompt_ids) > keep
    prompt_ids = prompt_ids[-keep:]
    return {
        "input_ids": prompt_ids + response_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
        "prompt_length": len(prompt_ids),
        "truncated": truncated,
    }


def collate(features: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-padded sequences for teacher forcing and left-padded prompts for generation."""
    batch_size = len(features)
    length = max(len(f["input_ids"]) for f in features)
    prompt_width = max(f["prompt_length"] for f in features)
    input_ids = torch.full((batch_size, length), pad_id)
    labels = torch.full((batch_size, length), IGNORE_INDEX)
    attention_mask = torch.zeros(batch_size, length, dtype=torch.long)
    prompt_mask = torch.zeros(batch_size, length, dtype=torch.bool)
    prompt_ids = torch.full((batch_size, prompt_width), pad_id)
    prompt_attention_mask = torch.zeros(batch_size, prompt_width, dtype=torch.long)
    for row, f in enumerate(features):
        n, p = len(f["input_ids"]), f["prompt_length"]
        input_ids[row, :n] = torch.tensor(f["input_ids"])
        labels[row, :n] = torch.tensor(f["labels"])
        attention_mask[row, :n] = 1
        prompt_mask[row, :p] = True
        prompt_ids[row, prompt_width - p :] = input_ids[row, :p]
        prompt_attention_mask[row, prompt_width - p :] = 1
    # Position t predicts token t + 1: shift labels here once, so every loss reads them aligned.
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return {
        "input_ids": input_ids,  # [B, L]
        "attention_mask": attention_mask,  # [B, L]
        "targets": targets,  # [B, L], the token each position predicts, or IGNORE_INDEX
        "prompt_mask": prompt_mask,  # [B, L]
        "prompt_ids": prompt_ids,  # [B, P], left-padded
        "prompt_attention_mask": prompt_attention_mask,  # [B, P]
        "rows": [f["row"] for f in features],
    }


def _read_file(path: str):
    """One local JSONL/Parquet file as a `datasets.Dataset`, or an error naming the file."""
    import datasets

    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: the file is empty")
    kind = _EXTENSIONS[os.path.splitext(path)[1]]
    try:
        return datasets.load_dataset(kind, data_files=path, split="train")
    except Exception as error:  # datasets wraps parse errors in its own generation error
        expected = "JSON lines (one object per line)" if kind == "json" else "a Parquet file"
        raise ValueError(f"{path}: could not be read as {expected}: {error}") from error


def load_rows(
    dataset: str, split: str, prompt_column: str, response_column: str, domain_column: str | None
) -> list[dict[str, Any]]:
    """Rows of a local directory ({split}.jsonl or .parquet), a local file, or a `datasets` name."""
    import datasets

    if os.path.isdir(dataset):
        found = [os.path.join(dataset, split + ext) for ext in _EXTENSIONS if os.path.isfile(os.path.join(dataset, split + ext))]
        if not found:
            raise FileNotFoundError(f"data.dataset {dataset!r}: no {split}.jsonl or {split}.parquet in this directory")
        path = found[0]
        table = _read_file(path)
    elif os.path.splitext(dataset)[1] in _EXTENSIONS:
        if not os.path.isfile(dataset):
            raise FileNotFoundError(f"data.dataset {dataset!r}: file not found")
        path = dataset
        whole = _read_file(path)
        # One file: a fixed 80/10/10 split by a fixed seed, so every run sees the same test rows.
        parts = whole.train_test_split(test_size=0.2, seed=0)
        held_out = parts["test"].train_test_split(test_size=0.5, seed=0)
        table = {"train": parts["train"], "val": held_out["train"], "test": held_out["test"]}[split]
    else:
        path = dataset
        table = datasets.load_dataset(dataset, split={"val": "validation"}.get(split, split))
    columns = {"prompt": prompt_column, "response": response_column}
    if domain_column:
        columns["domain"] = domain_column
    for field, column in columns.items():
        if column not in table.column_names:
            raise ValueError(
                f"{path}: column {column!r} (data.{field}_column) is missing; the columns are {table.column_names}"
            )
    rows = []
    for index, record in enumerate(table):
        for field, column in columns.items():
            if record[column] is None or str(record[column]) == "":
                raise ValueError(f"{path}: row {index} has an empty {column!r} (data.{field}_column)")
        row = {field: str(record[column]) for field, column in columns.items()}
        row.setdefault("domain", "default")
        row["metadata"] = record.get("metadata")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: the {split} split is empty")
    return rows


class FusionDataModule(L.LightningDataModule):
    """Train/val/test splits of (prompt, response, domain) rows, tokenized with the student's tokenizer.

    Args:
        tokenizer: path of the student's tokenizer (linked to `model.student` by the CLI).
        dataset: "suite" for the embedded reasoning-gym suite, else a directory with
            {train,val,test}.jsonl|parquet, one such file (split 80/10/10 with a fixed seed), or a
            `datasets` name.
        domains: the suite's domains (only with dataset "suite").
        train_size, val_size, test_size: examples per domain in each split of the suite.
        seed: the suite's generation seed; the splits are disjoint and fixed by it.
        prompt_column, response_column, domain_column: column names for other data sets.
        max_length: longest tokenized example.
        overlong: what happens to a longer example: "truncate" cuts its prompt from the left,
            "drop" leaves it out; either way the count is reported per split.
    """

    def __init__(
        self,
        tokenizer: str = "checkpoints/zoo/student",
        dataset: str = "suite",
        domains: list[str] = tasks.DEFAULT_DOMAINS,
        train_size: int = 200,
        val_size: int = 50,
        test_size: int = 100,
        seed: int = 0,
        prompt_column: str = "prompt",
        response_column: str = "response",
        domain_column: str | None = "domain",
        max_length: int = 64,
        overlong: str = "truncate",
        batch_size: int = 32,
        eval_batch_size: int = 128,
        num_workers: int = 0,
    ):
        super().__init__()
        for key in ("train_size", "val_size", "test_size", "max_length", "batch_size", "eval_batch_size"):
            if locals()[key] < 1:
                raise ValueError(f"data.{key} must be at least 1, got {locals()[key]}")
        if overlong not in ("truncate", "drop"):
            raise ValueError(f"data.overlong must be 'truncate' or 'drop', got {overlong!r}")
        if dataset == "suite":
            for domain in domains:
                tasks._check_domain(domain)
        self.save_hyperparameters()
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self.overlong_counts: dict[str, int] = {}
        self._tokenizer: PreTrainedTokenizerBase | None = None

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.hparams.tokenizer)
        return self._tokenizer

    def load(self) -> dict[str, list[dict[str, Any]]]:
        """Read (or generate) every split once; validates columns before any training."""
        if not self.rows:
            h = self.hparams
            if h.dataset == "suite":
                sizes = {"test": h.test_size, "val": h.val_size, "train": h.train_size}
                self.rows = tasks.build_splits(h.domains, sizes, h.seed)
            else:
                self.rows = {s: load_rows(h.dataset, s, h.prompt_column, h.response_column, h.domain_column) for s in SPLITS}
        return self.rows

    @property
    def domain_names(self) -> list[str]:
        return sorted({row["domain"] for split in self.load().values() for row in split})

    def setup(self, stage: str | None = None) -> None:
        self.load()

    def _features(self, split: str) -> list[dict[str, Any]]:
        features = []
        for row in self.load()[split]:
            feature = encode(self.tokenizer, row["prompt"], row["response"], self.hparams.max_length)
            feature["row"] = row
            features.append(feature)
        overlong = sum(f["truncated"] for f in features)
        self.overlong_counts[split] = overlong
        if overlong:
            action = "truncated from the left" if self.hparams.overlong == "truncate" else "dropped"
            rank_zero_info(f"data: {overlong} of {len(features)} {split} rows are longer than data.max_length={self.hparams.max_length} and were {action} (data.overlong)")
            if self.hparams.overlong == "drop":
                features = [f for f in features if not f["truncated"]]
                if not features:
                    raise ValueError(f"data: every {split} row is longer than data.max_length={self.hparams.max_length}")
        return features

    def _collate(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(features, self.tokenizer.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        # Shuffled by (seed, epoch) and resumable mid-epoch; one shard per process under DDP.
        trainer = self.trainer
        return ResumableLoader(
            self._features("train"),
            batch_size=self.hparams.batch_size,
            seed=run_seed(),
            num_replicas=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
            num_workers=self.hparams.num_workers,
            collate_fn=self._collate,
        )

    def _eval_loader(self, split: str) -> DataLoader:
        # Under DDP, Lightning gives each process every world_size-th row (DistributedSampler).
        return DataLoader(self._features(split), batch_size=self.hparams.eval_batch_size, num_workers=self.hparams.num_workers, collate_fn=self._collate)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        """The fusion corpus in a fixed order: `predict` caches the sources' outputs on it."""
        return self._eval_loader("train")
