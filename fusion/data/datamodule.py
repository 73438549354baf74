"""Data: the embedded task suite or any local JSONL/Parquet file or `datasets` name, tokenized
for distillation (loss on response tokens only) and for greedy evaluation (left-padded prompts).
"""

from __future__ import annotations

import math
import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from fusion.data import IGNORE_INDEX, tasks
from fusion.data.tokenizer import load_tokenizer
from fusion.utils.resume import ResumableLoader, WeightedDomainSampler, run_seed

SPLITS = ("train", "val", "test")
_EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
HELD_OUT, TEST_OF_HELD_OUT = 0.2, 0.5  # one data file: 80% train; the other 20% half val, half test


def one_file_split_sizes(rows: int) -> dict[str, int]:
    """Rows of each split of a single data file, as `datasets`' train_test_split rounds them
    (held-out and test counts rounded up)."""
    held_out = math.ceil(HELD_OUT * rows)
    test = math.ceil(TEST_OF_HELD_OUT * held_out)
    return {"train": rows - held_out, "val": held_out - test, "test": test}


# The fewest rows a single file needs for a train, a val and a test row (6).
MIN_ONE_FILE_ROWS = next(n for n in range(1, 1000) if min(one_file_split_sizes(n).values()) >= 1)


class ChatFormat:
    """A tokenizer's chat template applied to the data (`data.chat_template: true`).

    A prompt becomes one user turn followed by the template's generation prompt, the text
    `apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
    tokenize=False)` (its bos, if any, is the template's); a response ends with the template's
    end-of-turn token: the first token it writes after an assistant message (e.g. Qwen's
    <|im_end|>), or eos if it writes none.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, key: str = "data.chat_template"):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"{key}: the tokenizer {tokenizer.name_or_path!r} has no chat template (no chat_template in its "
                f"tokenizer_config.json or chat_template.jinja); use an instruct model's tokenizer, or set {key}: false "
                "to train on the raw prompt text"
            )
        self.tokenizer = tokenizer
        marker = "\x1fRESPONSE\x1f"
        turns = [{"role": "user", "content": "question"}, {"role": "assistant", "content": marker}]
        text = tokenizer.apply_chat_template(turns, tokenize=False)
        after = text[text.index(marker) + len(marker) :] if marker in text else ""
        after_ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
        self.end_id: int = after_ids[0] if after_ids else tokenizer.eos_token_id
        self.template = tokenizer.chat_template  # what the encoding depends on (cache fingerprints)
        if self.end_id != tokenizer.eos_token_id:
            rank_zero_warn(
                f"{key}: responses end with the template's end of turn {tokenizer.convert_ids_to_tokens(self.end_id)!r}, "
                f"but generation stops at eos {tokenizer.eos_token!r}: evaluation answers may run past the end of turn"
            )

    def render(self, prompt: str) -> str:
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)


def encode(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str | None, max_length: int, chat: ChatFormat | None = None
) -> dict[str, Any]:
    """`[bos] prompt response [eos]`; labels only on response and eos. Long prompts lose their start.

    With no response (a prompt without an answer yet) the sequence is `[bos] prompt` and no
    position is trained. With `chat` (the tokenizer's chat template): the rendered prompt's ids,
    then the response and the template's end-of-turn token (labels on those).
    """
    prompt_ids = _prompt_ids(tokenizer, [prompt], chat)[0]
    response_ids = None if response is None else tokenizer(response, add_special_tokens=False)["input_ids"]
    return _assemble(prompt_ids, response_ids, chat.end_id if chat else tokenizer.eos_token_id, max_length)


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, prompts: list[str], chat: ChatFormat | None) -> list[list[int]]:
    """`[bos] prompt` ids of each prompt, or with `chat` the ids of its rendered text; one tokenizer call."""
    if not prompts:
        return []
    if chat is not None:
        return tokenizer([chat.render(p) for p in prompts], add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [bos + ids for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]


def _assemble(prompt_ids: list[int], response_ids: list[int] | None, eos_id: int, max_length: int) -> dict[str, Any]:
    """`encode`'s sequence from the prompt's ids (bos included) and the response's (eos not yet)."""
    if response_ids is None:
        prompt_ids = prompt_ids[-max_length:]
        return {"input_ids": prompt_ids, "labels": [IGNORE_INDEX] * len(prompt_ids), "prompt_length": len(prompt_ids), "truncated": False}
    response_ids = (response_ids + [eos_id])[: max_length - 1]
    keep = max_length - len(response_ids)
    truncated = len(prompt_ids) > keep
    prompt_ids = prompt_ids[-keep:]
    return {
        "input_ids": prompt_ids + response_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
        "prompt_length": len(prompt_ids),
        "truncated": truncated,
    }


FEATURES = ("input_ids", "labels", "prompt_length", "truncated")  # what `encode` returns


def encode_batch(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], responses: list[str | None], max_length: int, chat: ChatFormat | None = None
) -> dict[str, list]:
    """`encode` of many rows, with one tokenizer call for the prompts and one for the responses:
    the same ids, as columns (a `FEATURES` key -> one value per row)."""
    prompt_ids = _prompt_ids(tokenizer, prompts, chat)
    end_id = chat.end_id if chat else tokenizer.eos_token_id
    answered = [i for i, response in enumerate(responses) if response is not None]
    response_ids = tokenizer([responses[i] for i in answered], add_special_tokens=False)["input_ids"] if answered else []
    by_row = dict(zip(answered, response_ids))
    columns: dict[str, list] = {key: [] for key in FEATURES}
    for i, ids in enumerate(prompt_ids):
        feature = _assemble(ids, by_row.get(i), end_id, max_length)
        for key in FEATURES:
            columns[key].append(feature[key])
    return columns


def encode_table(
    table,
    tokenizer: PreTrainedTokenizerBase,
    prompt_column: str,
    response_column: str | None,
    max_length: int,
    chat: ChatFormat | None = None,
):
    """A `datasets.Dataset` of rows -> the `datasets.Dataset` of their `encode` features, one row
    each, in order, by `Dataset.map` in batches. A table read from files (or a `datasets` name)
    keeps the result in its cache, keyed by datasets' fingerprint of the table, the tokenizer and
    these settings: a later run with the same ones reads it instead of tokenizing again. Values
    are read as `load_rows` reads them (as text; an empty or missing response: none)."""

    def encode_rows(batch: dict[str, list]) -> dict[str, list]:
        prompts = [str(value) for value in batch[prompt_column]]
        responses = [
            None if response_column is None or _empty(value) else str(value)
            for value in (batch[response_column] if response_column is not None else [None] * len(prompts))
        ]
        return encode_batch(tokenizer, prompts, responses, max_length, chat)

    return table.map(encode_rows, batched=True, num_proc=None, remove_columns=table.column_names, desc="data: tokenizing")


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
        "labelled": torch.tensor([f["row"] is None or is_labelled(f["row"]) for f in features]),  # [B], False: a prompt without gold
    }


def is_labelled(row: dict[str, Any]) -> bool:
    """A row with a gold answer; an unlabeled row's response is None."""
    return row.get("response") is not None


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


def _table(dataset: str, split: str):
    """(path, `datasets.Dataset`) of one split of a local directory, a local file or a `datasets` name."""
    import datasets

    if os.path.isdir(dataset):
        found = [os.path.join(dataset, split + ext) for ext in _EXTENSIONS if os.path.isfile(os.path.join(dataset, split + ext))]
        if not found:
            raise FileNotFoundError(f"data.dataset {dataset!r}: no {split}.jsonl or {split}.parquet in this directory")
        return found[0], _read_file(found[0])
    if os.path.splitext(dataset)[1] in _EXTENSIONS:
        if not os.path.isfile(dataset):
            raise FileNotFoundError(f"data.dataset {dataset!r}: file not found")
        whole = _read_file(dataset)
        if len(whole) < MIN_ONE_FILE_ROWS:
            sizes = one_file_split_sizes(MIN_ONE_FILE_ROWS)
            raise ValueError(
                f"data.dataset {dataset!r}: {len(whole)} row{'s' if len(whole) != 1 else ''}; one file is split 80/10/10 "
                f"into train, val and test, which needs at least {MIN_ONE_FILE_ROWS} rows (then {sizes['train']}, "
                f"{sizes['val']} and {sizes['test']}). Add rows, or give a directory with train, val and test files"
            )
        # One file: a fixed 80/10/10 split by a fixed seed, so every run sees the same test rows.
        parts = whole.train_test_split(test_size=HELD_OUT, seed=0)
        held_out = parts["test"].train_test_split(test_size=TEST_OF_HELD_OUT, seed=0)
        return dataset, {"train": parts["train"], "val": held_out["train"], "test": held_out["test"]}[split]
    return dataset, datasets.load_dataset(dataset, split={"val": "validation"}.get(split, split))


def _check_columns(path: str, table, columns: dict[str, str]) -> None:
    for field, column in columns.items():
        if column not in table.column_names:
            raise ValueError(f"{path}: column {column!r} (data.{field}_column) is missing; the columns are {table.column_names}")


def _empty(value: Any) -> bool:
    return value is None or str(value) == ""


def load_rows(
    dataset: str, split: str, prompt_column: str, response_column: str, domain_column: str | None, missing_response: str = "error"
) -> list[dict[str, Any]]:
    """Rows of a local directory ({split}.jsonl or .parquet), a local file, or a `datasets` name.

    A train row without a response is an error, or with `missing_response="unlabeled"` an
    unlabeled prompt (its response None, nothing else of it kept but the prompt and domain).
    Val and test rows always need their answer.
    """
    path, table = _table(dataset, split)
    return _table_rows(path, table, split, prompt_column, response_column, domain_column, missing_response)


def _table_rows(
    path: str, table, split: str, prompt_column: str, response_column: str, domain_column: str | None, missing_response: str
) -> list[dict[str, Any]]:
    """`load_rows` of a table already read: one row per record, in order, or an error."""
    columns = {"prompt": prompt_column, "response": response_column} | ({"domain": domain_column} if domain_column else {})
    _check_columns(path, table, columns)
    rows = []
    for index, record in enumerate(table):
        if _empty(record[prompt_column]) or (domain_column and _empty(record[domain_column])):
            field = "prompt" if _empty(record[prompt_column]) else "domain"
            raise ValueError(f"{path}: row {index} has an empty {columns[field]!r} (data.{field}_column)")
        if _empty(record[response_column]):
            if split != "train" or missing_response != "unlabeled":
                hint = (
                    " (val and test rows need their answer)"
                    if split != "train"
                    else "; if the corpus has prompts without answers, set data.missing_response: unlabeled"
                )
                raise ValueError(f"{path}: row {index} has an empty {response_column!r} (data.response_column), in the {split} split{hint}")
            rows.append(unlabeled_row(str(record[prompt_column]), str(record[domain_column]) if domain_column else "default"))
            continue
        row = {field: str(record[column]) for field, column in columns.items()}
        row.setdefault("domain", "default")
        row["metadata"] = record.get("metadata")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: the {split} split is empty")
    return rows


def load_prompts(path: str, prompt_column: str, domain_column: str | None) -> list[dict[str, Any]]:
    """A file of prompts without answers (JSONL or Parquet): unlabeled rows. Any other column,
    an answer included, is left out, so nothing downstream can read it."""
    return _prompt_table(path, prompt_column, domain_column)[1]


def _prompt_table(path: str, prompt_column: str, domain_column: str | None) -> tuple[Any, list[dict[str, Any]]]:
    """(the table, `load_prompts`' rows: one per record, in order)."""
    if os.path.splitext(path)[1] not in _EXTENSIONS:
        raise ValueError(f"data.unlabeled_file {path!r}: expected a .jsonl, .json or .parquet file of prompts")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.unlabeled_file {path!r}: file not found")
    table = _read_file(path)
    columns = {"prompt": prompt_column} | ({"domain": domain_column} if domain_column and domain_column in table.column_names else {})
    _check_columns(path, table, columns)
    rows = []
    for index, record in enumerate(table):
        if _empty(record[prompt_column]):
            raise ValueError(f"{path}: row {index} has an empty {prompt_column!r} (data.prompt_column)")
        rows.append(unlabeled_row(str(record[prompt_column]), str(record[domain_column]) if "domain" in columns else "default"))
    if not rows:
        raise ValueError(f"data.unlabeled_file {path!r}: the file has no rows")
    return table, rows


def unlabeled_row(prompt: str, domain: str) -> dict[str, Any]:
    """A prompt without gold: no response and no metadata (the suite's metadata holds the answer)."""
    return {"prompt": prompt, "response": None, "domain": domain, "metadata": None}


class FusionDataModule(L.LightningDataModule):
    """Train/val/test splits of (prompt, response, domain) rows, tokenized with the student's tokenizer.

    The fusion corpus (what the student trains on) is the train split's labelled rows plus, when
    the config declares them, unlabeled prompts: rows whose response is None and whose answer
    the sources write during training (see `fusion.stages.fusion`). Val and test rows are always labelled.

    Args:
        tokenizer: path of the student's tokenizer (linked to `model.student` by the CLI).
        dataset: "suite" for the embedded reasoning-gym suite, else a directory with
            {train,val,test}.jsonl|parquet, one such file (split 80/10/10 with a fixed seed; at
            least MIN_ONE_FILE_ROWS = 6 rows, so that val and test get one each), or a
            `datasets` name.
        domains: the suite's domains (only with dataset "suite").
        train_size, val_size, test_size: examples per domain in each split of the suite.
        unlabeled_size: the suite's unlabeled prompts per domain (one number, or domain -> number:
            more prompts where the student trails its sources most), drawn like the train split
            (never a val or test prompt, never a train prompt); their answers and metadata are
            dropped.
        unlabeled_file: a JSONL/Parquet file of prompts without answers (the prompt column, and
            the domain column where present; any other column is dropped) added to the corpus.
        missing_response: "error" (default): a train row without a response stops the run;
            "unlabeled": such rows are unlabeled prompts.
        seed: the suite's generation seed; the splits are disjoint and fixed by it.
        prompt_column, response_column, domain_column: column names for other data sets.
        max_length: longest tokenized example.
        overlong: what happens to a longer example: "truncate" cuts its prompt from the left,
            "drop" leaves it out; either way the count is reported per split.
        chat_template: render each prompt with the student tokenizer's chat template (one user
            turn and the generation prompt) and end each response with the template's
            end-of-turn token, for instruct models (see `ChatFormat`); false: the raw text.
    """

    def __init__(
        self,
        tokenizer: str = "checkpoints/zoo/student",
        dataset: str = "suite",
        domains: list[str] = tasks.DEFAULT_DOMAINS,
        train_size: int = 200,
        val_size: int = 50,
        test_size: int = 100,
        unlabeled_size: int | dict[str, int] = 0,
        unlabeled_file: str | None = None,
        missing_response: str = "error",
        seed: int = 0,
        prompt_column: str = "prompt",
        response_column: str = "response",
        domain_column: str | None = "domain",
        max_length: int = 64,
        overlong: str = "truncate",
        chat_template: bool = False,
        batch_size: int = 32,
        eval_batch_size: int = 128,
        num_workers: int = 0,
    ):
        super().__init__()
        for key in ("train_size", "val_size", "test_size", "max_length", "batch_size", "eval_batch_size"):
            if locals()[key] < 1:
                raise ValueError(f"data.{key} must be at least 1, got {locals()[key]}")
        per_domain = unlabeled_size if isinstance(unlabeled_size, dict) else {}
        if (min(per_domain.values(), default=0) if per_domain else unlabeled_size) < 0:
            raise ValueError(f"data.unlabeled_size must be at least 0 (a number, or domain -> number), got {unlabeled_size}")
        if set(per_domain) - set(domains):
            raise ValueError(
                f"data.unlabeled_size names domains {sorted(set(per_domain) - set(domains))} that data.domains {domains} does not have"
            )
        if unlabeled_size and dataset != "suite":
            raise ValueError(
                "data.unlabeled_size draws prompts from the embedded suite (data.dataset: suite); "
                "for your own data use data.unlabeled_file or data.missing_response: unlabeled"
            )
        if overlong not in ("truncate", "drop"):
            raise ValueError(f"data.overlong must be 'truncate' or 'drop', got {overlong!r}")
        if missing_response not in ("error", "unlabeled"):
            raise ValueError(f"data.missing_response must be 'error' or 'unlabeled', got {missing_response!r}")
        if dataset == "suite":
            for domain in domains:
                tasks._check_domain(domain)
        self.save_hyperparameters()
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self.overlong_counts: dict[str, int] = {}
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._chat: ChatFormat | None = None
        # Rows read from files or a `datasets` name are tokenized by `Dataset.map` over their
        # table (cached by datasets): per row list of `rows`, where each row came from, (table
        # key, record index) or None (made in Python: the suite); table key -> (table, columns).
        self._origins: dict[str, list[tuple[str, int] | None]] = {}
        self._tables: dict[str, tuple[Any, str, str | None]] = {}
        self._encoded: dict[str, list[dict[str, Any]]] = {}

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.hparams.tokenizer)
        return self._tokenizer

    @property
    def chat(self) -> ChatFormat | None:
        """The student tokenizer's chat template when data.chat_template is set, else None."""
        if not self.hparams.chat_template:
            return None
        if self._chat is None or self._chat.tokenizer is not self.tokenizer:
            self._chat = ChatFormat(self.tokenizer)
        return self._chat

    def suite_sizes(self) -> dict[str, int | dict[str, int]]:
        """The embedded suite's split sizes, in the order they are drawn (`tasks.build_splits`): the
        prompts without gold after the others, so the labelled splits do not depend on them."""
        h = self.hparams
        sizes = {"test": h.test_size, "val": h.val_size, "train": h.train_size}
        if h.unlabeled_size:
            sizes["unlabeled"] = h.unlabeled_size
        return sizes

    def load(self) -> dict[str, list[dict[str, Any]]]:
        """Read (or generate) every split once; validates columns before any training.

        Keys: train (labelled rows), unlabeled (prompts without gold, maybe none), val, test.
        """
        if not self.rows:
            h = self.hparams
            if h.dataset == "suite":
                rows = tasks.build_splits(h.domains, self.suite_sizes(), h.seed)
                rows["unlabeled"] = [unlabeled_row(r["prompt"], r["domain"]) for r in rows.get("unlabeled", [])]
            else:
                rows = {}
                for split in SPLITS:
                    path, table = _table(h.dataset, split)
                    rows[split] = _table_rows(path, table, split, h.prompt_column, h.response_column, h.domain_column, h.missing_response)
                    self._tables[split] = (table, h.prompt_column, h.response_column)
                    self._origins[split] = [(split, index) for index in range(len(rows[split]))]
                labelled = [is_labelled(r) for r in rows["train"]]
                for key, keep in (("unlabeled", False), ("train", True)):
                    self._origins[key] = [o for o, is_gold in zip(self._origins["train"], labelled) if is_gold == keep]
                    rows[key] = [r for r, is_gold in zip(rows["train"], labelled) if is_gold == keep]
            if h.unlabeled_file:
                table, prompts = _prompt_table(h.unlabeled_file, h.prompt_column, h.domain_column)
                self._tables["unlabeled_file"] = (table, h.prompt_column, None)
                self._origins["unlabeled"] = self._origins.get("unlabeled", [None] * len(rows["unlabeled"])) + [
                    ("unlabeled_file", index) for index in range(len(prompts))
                ]
                rows["unlabeled"] += prompts
            if h.chat_template and rows["unlabeled"]:
                raise ValueError(
                    "data.chat_template applies to labelled rows only: the answers written for unlabeled prompts are "
                    "encoded from the raw prompt; leave out the unlabeled prompts (data.unlabeled_size, "
                    "data.unlabeled_file, data.missing_response) or set data.chat_template: false"
                )
            if not rows["train"]:
                raise ValueError(
                    f"data.dataset {h.dataset!r}: the train split has no labelled row; the fusion corpus needs some "
                    "gold answers (they are how sources are weighed and the selector learns)"
                )
            self.rows = rows
        return self.rows

    def corpus(self, unlabeled: bool = True) -> list[dict[str, Any]]:
        """The fusion corpus: the labelled train rows, then (if asked) the unlabeled prompts."""
        rows = self.load()
        return rows["train"] + (rows["unlabeled"] if unlabeled else [])

    @property
    def domain_names(self) -> list[str]:
        return sorted({row["domain"] for split in self.load().values() for row in split})

    def setup(self, stage: str | None = None) -> None:
        self.load()
        self.chat  # a tokenizer without a chat template stops here, before any training step

    def encoded(self, key: str) -> list[dict[str, Any]]:
        """The `encode` features of the rows `load()[key]`, each with its row, computed once: rows
        read from files or a `datasets` name by `Dataset.map` over their table (`encode_table`),
        the suite's in one batched tokenizer call (`encode_batch`)."""
        if key not in self._encoded:
            rows = self.load()[key]
            origins = self._origins.get(key, [None] * len(rows))
            features: list[dict[str, Any] | None] = [None] * len(rows)
            for source in sorted({o[0] for o in origins if o is not None}):
                table, prompt_column, response_column = self._tables[source]
                columns = encode_table(table, self.tokenizer, prompt_column, response_column, self.hparams.max_length, self.chat).to_dict()
                for i, origin in enumerate(origins):
                    if origin is not None and origin[0] == source:
                        features[i] = {name: columns[name][origin[1]] for name in FEATURES}
            python = [i for i, origin in enumerate(origins) if origin is None]
            if python:
                columns = encode_batch(
                    self.tokenizer,
                    [rows[i]["prompt"] for i in python],
                    [rows[i]["response"] for i in python],
                    self.hparams.max_length,
                    self.chat,
                )
                for j, i in enumerate(python):
                    features[i] = {name: columns[name][j] for name in FEATURES}
            self._encoded[key] = [feature | {"row": row} for feature, row in zip(features, rows)]
        return self._encoded[key]

    def _features(self, split: str, keys: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
        """The features of `split` (or of the row lists `keys`, reported as `split`), overlong rows
        truncated or dropped (data.overlong) and counted."""
        features = [f for key in (keys or (split,)) for f in self.encoded(key)]
        overlong = sum(f["truncated"] for f in features)
        self.overlong_counts[split] = overlong
        if overlong:
            action = "truncated from the left" if self.hparams.overlong == "truncate" else "dropped"
            rank_zero_info(
                f"data: {overlong} of {len(features)} {split} rows are longer than data.max_length={self.hparams.max_length} and were {action} (data.overlong)"
            )
            if self.hparams.overlong == "drop":
                features = [f for f in features if not f["truncated"]]
                if not features:
                    raise ValueError(f"data: every {split} row is longer than data.max_length={self.hparams.max_length}")
        return features

    def _collate(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(features, self.tokenizer.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        # Shuffled by (seed, epoch) and resumable mid-epoch; one shard per process under DDP. A
        # module that cannot answer prompts itself (plain SFT) trains on the labelled rows alone.
        # A module with a curriculum (`fusion.objectives.curriculum`) draws each row's domain by its weights.
        trainer = self.trainer
        module = trainer.lightning_module if trainer else None
        unlabeled = getattr(module, "learns_from_unlabeled", False)
        features = self._features("train", ("train", "unlabeled") if unlabeled else ("train",))
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        curriculum, sampler = getattr(module, "curriculum", None), None
        if curriculum is not None:
            index = {domain: i for i, domain in enumerate(curriculum.domains)}
            sampler = WeightedDomainSampler(
                features,
                [index[f["row"]["domain"]] for f in features],
                len(index),
                curriculum.weights,
                num_replicas=replicas,
                rank=rank,
                seed=run_seed(),
            )
        return ResumableLoader(
            features,
            batch_size=self.hparams.batch_size,
            seed=run_seed(),
            num_replicas=replicas,
            rank=rank,
            sampler=sampler,
            num_workers=self.hparams.num_workers,
            collate_fn=self._collate,
        )

    def _eval_loader(self, split: str) -> DataLoader:
        # Under DDP, Lightning gives each process every world_size-th row (DistributedSampler).
        return DataLoader(
            self._features(split), batch_size=self.hparams.eval_batch_size, num_workers=self.hparams.num_workers, collate_fn=self._collate
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def labelled_loader(self) -> DataLoader:
        """Every labelled train row in a fixed order, on every process (not sharded)."""
        return self._eval_loader("train")

    def predict_dataloader(self) -> DataLoader | list[DataLoader]:
        """The fusion corpus in a fixed order: `predict` caches the sources' outputs on it. With
        unlabeled prompts, a second loader of those (answered after the labelled rows)."""
        if not self.load()["unlabeled"]:
            return self._eval_loader("train")
        return [self._eval_loader("train"), self._eval_loader("unlabeled")]
