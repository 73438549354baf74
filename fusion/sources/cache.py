"""The offline cache: every source's top-K over the student vocabulary, computed once.

    python -m fusion.train predict --config configs/quickstart.yaml --config configs/cache.yaml
    python -m fusion.train fit     --config configs/quickstart.yaml --config configs/cache.yaml --model.source_mode=cached

`predict` runs all N sources over the labelled rows of the fusion corpus and writes, per row and
source, the top-K student token ids and log-probabilities at each trained position, whether the
position is aligned, and the source's CE on the gold response. Training with
`model.source_mode: cached` reads these instead of running sources, so the selector observes
all N sources for free on every labelled row.

Unlabeled prompts come after the labelled rows: the source the method picks writes each answer
once (`fusion.stages.fusion`: the selector, fitted first on the labelled rows' cached CE, picks it), and
the record holds that answer's text, the sources that ran along it (the k selected, or all N for
`uniform` and `confidence`) with their top-K, and how many sources wrote an answer for it. The
answer settings are part of the fingerprint: a cache answered for another method, k or decoding
is refused.

Layout of `model.cache_dir`:

    fingerprint.json            what the cache was computed from (see `cache_fingerprint`)
    shard-r{rank}-{n:05d}/      a `datasets` Arrow dataset, one per rank and chunk of rows
        manifest.json           row count and the size and sha256 of every file of the shard

A shard directory is written under a temporary name and renamed when complete, so an
interrupted run leaves no shard that looks complete; the manifest catches a file truncated
later. Under DDP every rank writes its own shards.

Bytes per trained token per source: K ids (uint16 when the student vocabulary has at most
65536 tokens, else int32) and K float16 log-probs: 40 bytes at K = 10 with a small vocabulary,
60 with a large one, plus one bit for the alignment flag. Only trained (response) positions are
stored; prompt positions never carry a target.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil

import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from fusion.data import IGNORE_INDEX
from fusion.sources.pool import SourceOutputs
from fusion.utils.io import atomic_directory, atomic_write_json

FORMAT_VERSION = 3  # 2: per-record sources, answers of unlabeled prompts; 3: sources read prompt and response tokenized apart
SHARD_NAME = re.compile(r"shard-r\d+-\d{5}")


# ------------------------------------------------------------------------------------ fingerprints


def _sha256_files(paths: list[str]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def model_fingerprint(path: str) -> str:
    """Hash of a model directory's config and weights (safetensors); a hub name hashes as itself."""
    if not os.path.isdir(path):
        return hashlib.sha256(path.encode()).hexdigest()[:16]
    files = glob.glob(os.path.join(path, "*.safetensors")) + [os.path.join(path, "config.json")]
    return _sha256_files([f for f in files if os.path.isfile(f)])


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    text += json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def row_key(row: dict) -> str:
    """A row's identity in the cache: its prompt and gold response (none for an unlabeled prompt)."""
    response = row["response"] if row["response"] is not None else "\x01unlabelled"  # the key of stored caches: never respelled
    return hashlib.sha256(f"{row['prompt']}\x00{response}".encode()).hexdigest()[:24]


def data_fingerprint(rows: list[dict], max_length: int) -> str:
    keys = sorted(row_key(r) for r in rows)
    return hashlib.sha256(json.dumps([keys, max_length]).encode()).hexdigest()[:16]


def cache_fingerprint(sources: dict[str, str], student_tokenizer, source_tokenizers: dict, rows: list[dict], settings: dict) -> dict:
    """Everything the cached numbers depend on, part by part, so a mismatch can name its part.

    sources: name -> path; source_tokenizers: name -> tokenizer; settings: top_k, temperature,
    and the alignment settings.
    """
    parts = {"format": FORMAT_VERSION, "sources": list(sources)}
    for index, (name, path) in enumerate(sources.items()):
        parts[f"source {index} weights"] = model_fingerprint(path)
        parts[f"source {index} tokenizer"] = tokenizer_fingerprint(source_tokenizers[name])
    parts["student tokenizer"] = tokenizer_fingerprint(student_tokenizer)
    parts["data"] = data_fingerprint(rows, settings.pop("max_length"))
    return parts | settings


def is_current(directory: str, expected: dict) -> bool:
    """Whether `directory` holds a complete cache computed for exactly `expected` (no error)."""
    try:
        check_fingerprint(directory, expected)
    except (FileNotFoundError, ValueError):
        return False
    return bool(list_shards(directory))


def check_fingerprint(directory: str, expected: dict) -> None:
    """Stop before training when the cache at `directory` was computed from anything else."""
    path = os.path.join(directory, "fingerprint.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"model.cache_dir {directory!r}: no cache here (no fingerprint.json); write one with "
            "`python -m fusion.train predict` and the same config"
        )
    with open(path) as f:
        found = json.load(f)
    differ = [part for part in sorted(set(expected) | set(found)) if expected.get(part) != found.get(part)]
    if differ:
        details = "; ".join(f"{part}: cache has {found.get(part)!r}, this run has {expected.get(part)!r}" for part in differ)
        raise ValueError(f"model.cache_dir {directory!r} was computed for a different setup ({', '.join(differ)} differ): {details}")


# ------------------------------------------------------------------------------------ writing


def rows_to_records(batch: dict, out: SourceOutputs, selected: torch.Tensor) -> list[dict]:
    """One record per row from the outputs of its selected sources ([B, k, ...]), trained positions only.

    An answered prompt (batch["answers"], see `fusion.stages.fusion`) also records its answer, how
    many sources wrote one, and which source's was used.
    """
    records = []
    trained = batch["targets"] != IGNORE_INDEX
    answers = batch.get("answers") or [None] * len(batch["rows"])
    for b, row in enumerate(batch["rows"]):
        positions = trained[b].nonzero().squeeze(-1)
        answer = answers[b] or {}
        records.append(
            {
                "key": row_key(row),
                "positions": len(positions),
                "sources": selected[b].tolist(),
                "ce": out.ce[b].tolist(),
                "valid": out.valid[b].tolist(),
                "ids": out.ids[b][:, positions].cpu(),  # [k, P, K]
                "logprobs": out.logprobs[b][:, positions].cpu(),
                "aligned": out.aligned[b][:, positions].cpu(),  # [k, P]
                "answer": answer.get("text"),
                "writer": answer.get("writer", -1),
                "generations": answer.get("generations", 0),
            }
        )
    return records


def write_shard(directory: str, name: str, records: list[dict], vocab_size: int) -> str:
    """Write `records` as one Arrow shard `directory/name`, atomically (temporary dir + rename)."""
    import datasets

    id_type = "uint16" if vocab_size < 65535 else "int32"  # 65535 stands for an empty slot
    features = datasets.Features(
        {
            "key": datasets.Value("string"),
            "positions": datasets.Value("int32"),
            "sources": datasets.Sequence(datasets.Value("int16")),  # the sources stored, in the order of the arrays below
            "ce": datasets.Sequence(datasets.Value("float32")),
            "valid": datasets.Sequence(datasets.Value("bool")),
            "ids": datasets.Sequence(datasets.Value(id_type)),  # N * P * K, flattened; -1 stored as the max value
            "logprobs": datasets.Sequence(datasets.Value("float16")),
            "aligned": datasets.Sequence(datasets.Value("bool")),
            "answer": datasets.Value("string"),  # null for a labelled row
            "writer": datasets.Value("int16"),  # the source whose answer it is (-1: gold)
            "generations": datasets.Value("int16"),  # sources that wrote an answer for this prompt
        }
    )
    columns = {
        "key": [r["key"] for r in records],
        "positions": [r["positions"] for r in records],
        "sources": [r["sources"] for r in records],
        "ce": [r["ce"] for r in records],
        "valid": [r["valid"] for r in records],
        # Empty slots (-1) become the id type's largest value; the reader maps them back.
        "ids": [r["ids"].flatten().remainder(65536 if id_type == "uint16" else 2**31).tolist() for r in records],
        "logprobs": [r["logprobs"].flatten().clamp(min=-60000.0).half().tolist() for r in records],
        "aligned": [r["aligned"].flatten().tolist() for r in records],
        "answer": [r["answer"] for r in records],
        "writer": [r["writer"] for r in records],
        "generations": [r["generations"] for r in records],
    }
    final = os.path.join(directory, name)
    with atomic_directory(final) as temporary:  # complete, or not there under its name
        datasets.Dataset.from_dict(columns, features=features).save_to_disk(temporary)
        files = sorted(f for f in os.listdir(temporary) if os.path.isfile(os.path.join(temporary, f)))
        manifest = {
            "rows": len(records),
            "files": {
                f: {"bytes": os.path.getsize(os.path.join(temporary, f)), "sha256": _sha256_files([os.path.join(temporary, f)])}
                for f in files
            },
        }
        atomic_write_json(os.path.join(temporary, "manifest.json"), manifest)
    return final


class CacheWriter(BasePredictionWriter):
    """Lightning callback: each rank writes its predicted records as shards of `shard_rows` rows."""

    def __init__(self, directory: str, vocab_size: int, shard_rows: int = 4096):
        super().__init__(write_interval="batch")
        self.directory, self.vocab_size, self.shard_rows = directory, vocab_size, shard_rows
        self.pending: list[dict] = []
        self.written = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "predict":
            return
        os.makedirs(self.directory, exist_ok=True)
        if trainer.is_global_zero:
            # A new cache replaces an old one: drop its shards first, then record what this one is.
            for old in glob.glob(os.path.join(self.directory, "shard-*")):  # with stale .tmp/.old ones
                shutil.rmtree(old, ignore_errors=True)
            atomic_write_json(os.path.join(self.directory, "fingerprint.json"), pl_module.cache_fingerprint())
        trainer.strategy.barrier("fusion-cache-setup")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0) -> None:
        self.pending += prediction
        if len(self.pending) >= self.shard_rows:
            self._flush(trainer.global_rank)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        if self.pending:
            self._flush(trainer.global_rank)

    def _flush(self, rank: int) -> None:
        write_shard(self.directory, f"shard-r{rank}-{self.written:05d}", self.pending, self.vocab_size)
        self.written += 1
        self.pending = []


# ------------------------------------------------------------------------------------ reading


class SourceCache:
    """The cached outputs of the sources, looked up per batch by row key.

    The Arrow shards stay memory-mapped: the small columns (key, CE, answers) are read once, the
    top-K ids, log-probs and alignment flags are sliced out of the mapped files per batch, for
    the batch's rows only. Raises before training on a missing, mismatched, truncated or
    incomplete cache, naming the shard or the part that differs.
    """

    def __init__(self, directory: str, expected_fingerprint: dict, num_sources: int):
        check_fingerprint(directory, expected_fingerprint)
        shards = list_shards(directory)
        if not shards:
            raise ValueError(f"model.cache_dir {directory!r}: fingerprint.json but no shard; the predict run did not finish")
        self.num_sources, self.directory = num_sources, directory
        self.blocks: list[dict] = []  # per Arrow record batch: the flat mapped arrays and their offsets
        # key -> (block, row in block, trained positions, sources stored in that order)
        self.index: dict[str, tuple[int, int, int, list[int]]] = {}
        self.ce: dict[str, list[float]] = {}
        self.valid: dict[str, list[bool]] = {}
        self.answers: dict[str, dict] = {}  # key -> {"text", "writer", "generations", "sources"} for answered prompts
        self.top = None
        for shard in shards:
            dataset = _open_shard(shard)
            self.empty_id = (65536 if dataset.features["ids"].feature.dtype == "uint16" else 2**31) - 1
            for arrays in dataset.data.table.to_batches():
                block = {name: _flat(arrays.column(name)) for name in ("ids", "logprobs", "aligned")}
                self.blocks.append(block)
                small = arrays.select(["key", "positions", "sources", "ce", "valid", "answer", "writer", "generations"]).to_pylist()
                for row, record in enumerate(small):
                    key = record["key"]
                    if key in self.index:
                        continue  # DDP pads the last batch with repeats
                    self.index[key] = (len(self.blocks) - 1, row, record["positions"], record["sources"])
                    self.ce[key], self.valid[key] = record["ce"], record["valid"]
                    if record["answer"] is not None:
                        self.answers[key] = {
                            "text": record["answer"],
                            "writer": record["writer"],
                            "generations": record["generations"],
                            "sources": record["sources"],
                        }
                    if self.top is None and record["positions"]:
                        values, offsets = block["ids"]
                        self.top = int(offsets[row + 1] - offsets[row]) // (record["positions"] * len(record["sources"]))

    def _entry(self, row: dict) -> tuple[str, tuple[int, int, int, list[int]]]:
        key = row_key(row)
        if key not in self.index:
            raise ValueError(
                f"model.cache_dir {self.directory!r} has no entry for the train row {row['prompt']!r}; rebuild the cache for this data"
            )
        return key, self.index[key]

    def answer(self, row: dict) -> dict:
        """The cached answer of an unlabeled prompt: text ("" where its source wrote nothing),
        writer, generations, and the sources stored along it."""
        key, _ = self._entry(row)
        if key not in self.answers:
            raise ValueError(
                f"model.cache_dir {self.directory!r} holds no answer for the unlabeled prompt {row['prompt']!r}; rebuild the cache"
            )
        return self.answers[key]

    def lookup(self, batch: dict, selected: torch.Tensor) -> tuple[SourceOutputs, torch.Tensor, torch.Tensor]:
        """SourceOutputs for the selected [B, k] sources, and every source's ce and observed flag [B, N].

        A selected source must be stored for its row (every source for a labelled row, the ones
        that ran along the answer for an answered prompt). Only a labelled row's CE is an
        observation of quality: an answer's CE is not (its writer scores its own text well).
        """
        import numpy as np

        targets = batch["targets"]
        (size, k), length = selected.shape, targets.shape[1]
        top = self.top or 1
        ce, valid = torch.zeros(size, k), torch.zeros(size, k, dtype=torch.bool)
        ce_all, observed = torch.zeros(size, self.num_sources), torch.zeros(size, self.num_sources, dtype=torch.bool)
        pieces: dict[str, list] = {"ids": [], "logprobs": [], "aligned": []}
        where: list[torch.Tensor] = [[], [], []]  # batch row, slot, position of every gathered (source, position) pair
        trained = (targets != IGNORE_INDEX).cpu()
        for b, (row, chosen) in enumerate(zip(batch["rows"], selected.cpu().tolist())):
            key, (block, record, count, sources) = self._entry(row)
            positions = trained[b].nonzero().squeeze(-1)
            if len(positions) != count:
                raise ValueError(
                    f"model.cache_dir {self.directory!r}: the row {row['prompt']!r} has {len(positions)} trained tokens here and {count} in the cache"
                )
            arrays = self.blocks[block]
            for slot, source in enumerate(chosen):
                if source not in sources:
                    raise ValueError(
                        f"model.cache_dir {self.directory!r}: source {source} was not run on the row {row['prompt']!r} "
                        f"(the cache holds sources {sources}); the cache was answered for other settings"
                    )
                at = sources.index(source)
                for name, width in (("ids", top), ("logprobs", top), ("aligned", 1)):
                    values, offsets = arrays[name]
                    start = int(offsets[record]) + at * count * width
                    pieces[name].append(values[start : start + count * width])
                where[0].append(torch.full((count,), b))
                where[1].append(torch.full((count,), slot))
                where[2].append(positions)
                ce[b, slot], valid[b, slot] = self.ce[key][at], self.valid[key][at]
            if key not in self.answers:
                ce_all[b, sources] = torch.tensor(self.ce[key], dtype=torch.float)
                observed[b, sources] = torch.tensor(self.valid[key])
        ids = torch.full((size, k, length, top), -1, dtype=torch.long)
        logprobs = torch.full((size, k, length, top), float("-inf"))
        aligned = torch.zeros(size, k, length, dtype=torch.bool)
        if where[0]:
            index = tuple(torch.cat(part) for part in where)
            gathered = torch.from_numpy(np.concatenate(pieces["ids"]).astype(np.int64)).view(-1, top)
            ids[index] = torch.where(gathered == self.empty_id, -1, gathered)
            gathered_logprobs = torch.from_numpy(np.concatenate(pieces["logprobs"]).astype(np.float32)).view(-1, top)
            logprobs[index] = gathered_logprobs.masked_fill(ids[index] < 0, float("-inf"))
            aligned[index] = torch.from_numpy(np.concatenate(pieces["aligned"]))
        device = selected.device
        out = SourceOutputs(ids.to(device), logprobs.to(device), ce.to(device), valid.to(device), aligned.to(device))
        return out, ce_all.to(device), observed.to(device)

    def answer_summary(self) -> dict:
        """What answering the unlabeled prompts cost and who wrote the answers."""
        return summarize_answers(list(self.answers.values()), self.num_sources)


def summarize_answers(answers: list[dict], num_sources: int) -> dict:
    """prompts, generations (in all and per prompt), empty answers, and each source's share of the answers used."""
    prompts = len(answers)
    writers = [0] * num_sources
    for answer in answers:
        if answer["writer"] >= 0 and answer["text"]:
            writers[answer["writer"]] += 1
    generations = sum(a["generations"] for a in answers)
    return {
        "prompts": prompts,
        "generations": generations,
        "generations_per_prompt": generations / prompts if prompts else 0.0,
        "empty_answers": sum(not a["text"] for a in answers),
        "writers": writers,
    }


def answer_summary(directory: str) -> dict:
    """`summarize_answers` of a cache on disk, reading only the answer columns (for reports)."""
    with open(os.path.join(directory, "fingerprint.json")) as f:
        num_sources = len(json.load(f)["sources"])
    return summarize_answers(list(read_answers(directory).values()), num_sources)


def read_answers(directory: str) -> dict[str, dict]:
    """The answers of a cache on disk by row key (`row_key`): {"text", "writer", "generations",
    "sources"}, as `SourceCache.answer` gives them, for the answered prompts only. Reads only the
    answer columns and checks no fingerprint: for a stage that learns along the answers without
    the sources' numbers (`fusion.stages.srft`'s `model.demonstrations`)."""
    answers: dict[str, dict] = {}
    for shard in list_shards(directory):
        columns = ("key", "answer", "writer", "generations", "sources")
        table = _open_shard(shard).select_columns(list(columns)).to_dict()
        for key, text, writer, generations, sources in zip(*(table[name] for name in columns)):
            if text is not None and key not in answers:  # DDP pads the last batch with repeats
                answers[key] = {"text": text, "writer": writer, "generations": generations, "sources": sources}
    return answers


def _flat(column) -> tuple:
    """A list column of one Arrow record batch as (flat values, offsets) NumPy arrays: zero-copy
    views of the memory-mapped file for numbers, a copy for booleans (Arrow packs them in bits)."""
    return column.values.to_numpy(zero_copy_only=False), column.offsets.to_numpy()


def list_shards(directory: str) -> list[str]:
    """The complete shards of a cache: `shard-r<rank>-<n>`, never a `.tmp` or `.old` leftover."""
    return sorted(p for p in glob.glob(os.path.join(directory, "shard-*")) if SHARD_NAME.fullmatch(os.path.basename(p)))


def _open_shard(shard: str):
    """Load one shard after checking its manifest: a missing or altered file is named."""
    import datasets

    manifest_path = os.path.join(shard, "manifest.json")
    if not os.path.isfile(manifest_path):
        raise ValueError(f"cache shard {shard!r} has no manifest.json: it is incomplete; rebuild the cache")
    with open(manifest_path) as f:
        manifest = json.load(f)
    for name, expected in manifest["files"].items():
        path = os.path.join(shard, name)
        size = os.path.getsize(path) if os.path.isfile(path) else None
        if size != expected["bytes"]:
            raise ValueError(
                f"cache shard {shard!r}: {name} is {size} bytes, the manifest says {expected['bytes']} (truncated or missing); rebuild the cache"
            )
        if _sha256_files([path]) != expected["sha256"]:
            raise ValueError(f"cache shard {shard!r}: {name} does not match its checksum (corrupted); rebuild the cache")
    table = datasets.load_from_disk(shard)
    if len(table) != manifest["rows"]:
        raise ValueError(f"cache shard {shard!r} holds {len(table)} rows, the manifest says {manifest['rows']}")
    return table


def cache_size(directory: str) -> int:
    """Bytes on disk of the cache's Arrow files."""
    return sum(os.path.getsize(p) for shard in list_shards(directory) for p in glob.glob(os.path.join(shard, "*.arrow")))
