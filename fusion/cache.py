"""The offline cache: every source's top-K over the student vocabulary, computed once.

    python -m fusion.train predict --config configs/quickstart.yaml --config configs/cache.yaml
    python -m fusion.train fit     --config configs/quickstart.yaml --config configs/cache.yaml --model.source_mode=cached

`predict` runs all N sources over the fusion corpus (the train split) and writes, per row and
source, the top-K student token ids and log-probabilities at each trained position, whether the
position is aligned, and the source's CE on the gold response. Training with
`model.source_mode: cached` reads these instead of running sources, so the selector observes
all N sources for free.

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
from fusion.io import atomic_directory, atomic_write_json
from fusion.sources import SourceOutputs

FORMAT_VERSION = 1
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
    """A row's identity in the cache: its prompt and response."""
    return hashlib.sha256(f"{row['prompt']}\x00{row['response']}".encode()).hexdigest()[:24]


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


def rows_to_records(batch: dict, out: SourceOutputs) -> list[dict]:
    """One record per row from all N sources' outputs ([B, N, ...]), trained positions only."""
    records = []
    trained = batch["targets"] != IGNORE_INDEX
    for b, row in enumerate(batch["rows"]):
        positions = trained[b].nonzero().squeeze(-1)
        records.append({
            "key": row_key(row),
            "positions": len(positions),
            "ce": out.ce[b].tolist(),
            "valid": out.valid[b].tolist(),
            "ids": out.ids[b][:, positions].cpu(),  # [N, P, K]
            "logprobs": out.logprobs[b][:, positions].cpu(),
            "aligned": out.aligned[b][:, positions].cpu(),  # [N, P]
        })
    return records


def write_shard(directory: str, name: str, records: list[dict], vocab_size: int) -> str:
    """Write `records` as one Arrow shard `directory/name`, atomically (temporary dir + rename)."""
    import datasets

    id_type = "uint16" if vocab_size < 65535 else "int32"  # 65535 stands for an empty slot
    features = datasets.Features({
        "key": datasets.Value("string"),
        "positions": datasets.Value("int32"),
        "ce": datasets.Sequence(datasets.Value("float32")),
        "valid": datasets.Sequence(datasets.Value("bool")),
        "ids": datasets.Sequence(datasets.Value(id_type)),  # N * P * K, flattened; -1 stored as the max value
        "logprobs": datasets.Sequence(datasets.Value("float16")),
        "aligned": datasets.Sequence(datasets.Value("bool")),
    })
    columns = {
        "key": [r["key"] for r in records],
        "positions": [r["positions"] for r in records],
        "ce": [r["ce"] for r in records],
        "valid": [r["valid"] for r in records],
        # Empty slots (-1) become the id type's largest value; the reader maps them back.
        "ids": [r["ids"].flatten().remainder(65536 if id_type == "uint16" else 2**31).tolist() for r in records],
        "logprobs": [r["logprobs"].flatten().clamp(min=-60000.0).half().tolist() for r in records],
        "aligned": [r["aligned"].flatten().tolist() for r in records],
    }
    final = os.path.join(directory, name)
    with atomic_directory(final) as temporary:  # complete, or not there under its name
        datasets.Dataset.from_dict(columns, features=features).save_to_disk(temporary)
        files = sorted(f for f in os.listdir(temporary) if os.path.isfile(os.path.join(temporary, f)))
        manifest = {"rows": len(records), "files": {f: {"bytes": os.path.getsize(os.path.join(temporary, f)),
                                                         "sha256": _sha256_files([os.path.join(temporary, f)])} for f in files}}
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
    """The cached outputs of all N sources, looked up per batch by row key.

    Everything is read into flat tensors once (the cache of a fusion corpus is small next to
    the models); a batch is then a gather. Raises before training on a missing, mismatched,
    truncated or incomplete cache, naming the shard or the part that differs.
    """

    def __init__(self, directory: str, expected_fingerprint: dict, num_sources: int):
        import datasets

        check_fingerprint(directory, expected_fingerprint)
        shards = list_shards(directory)
        if not shards:
            raise ValueError(f"model.cache_dir {directory!r}: fingerprint.json but no shard; the predict run did not finish")
        self.num_sources = num_sources
        self.index: dict[str, tuple[int, int, int]] = {}  # key -> (offset, positions, row)
        ids, logprobs, aligned, ce, valid = [], [], [], [], []
        offset = 0
        for shard in shards:
            table = _open_shard(shard)
            table = table.with_format("numpy")
            for record in table:
                if record["key"] in self.index:
                    continue  # DDP pads the last batch with repeats
                count = int(record["positions"])
                self.index[record["key"]] = (offset, count, len(ce))
                offset += count
                ids.append(torch.from_numpy(record["ids"].astype("int64")).view(num_sources, count, -1))
                logprobs.append(torch.from_numpy(record["logprobs"].astype("float32")).view(num_sources, count, -1))
                aligned.append(torch.from_numpy(record["aligned"]).view(num_sources, count))
                ce.append(torch.from_numpy(record["ce"]))
                valid.append(torch.from_numpy(record["valid"]))
        wrap = 65536 if table.features["ids"].feature.dtype == "uint16" else 2**31
        ids = torch.cat(ids, dim=1)
        self.ids = torch.where(ids == wrap - 1, -1, ids)  # [N, total positions, K]
        self.logprobs = torch.cat(logprobs, dim=1).masked_fill(self.ids < 0, float("-inf"))
        self.aligned = torch.cat(aligned, dim=1)
        self.ce = torch.stack(ce).float()  # [rows, N]
        self.valid = torch.stack(valid)
        self.directory = directory

    def lookup(self, batch: dict, selected: torch.Tensor) -> tuple[SourceOutputs, torch.Tensor, torch.Tensor]:
        """SourceOutputs for the selected [B, k] sources, and every source's ce and valid [B, N]."""
        targets = batch["targets"]
        (size, k), length = selected.shape, targets.shape[1]
        top = self.ids.shape[-1]
        ids = torch.full((size, k, length, top), -1)
        logprobs = torch.full((size, k, length, top), float("-inf"))
        aligned = torch.zeros(size, k, length, dtype=torch.bool)
        rows = []
        selected_cpu = selected.cpu()
        for b, row in enumerate(batch["rows"]):
            key = row_key(row)
            if key not in self.index:
                raise ValueError(f"model.cache_dir {self.directory!r} has no entry for the train row {row['prompt']!r}; rebuild the cache for this data")
            offset, count, index = self.index[key]
            positions = (targets[b] != IGNORE_INDEX).nonzero().squeeze(-1)
            if len(positions) != count:
                raise ValueError(f"model.cache_dir {self.directory!r}: the row {row['prompt']!r} has {len(positions)} trained tokens here and {count} in the cache")
            chosen = selected_cpu[b]
            ids[b, :, positions] = self.ids[chosen, offset : offset + count]
            logprobs[b, :, positions] = self.logprobs[chosen, offset : offset + count]
            aligned[b, :, positions] = self.aligned[chosen, offset : offset + count]
            rows.append(index)
        ce_all, valid_all = self.ce[rows], self.valid[rows]
        device = selected.device
        out = SourceOutputs(ids.to(device), logprobs.to(device), ce_all.gather(1, selected_cpu).to(device),
                            valid_all.gather(1, selected_cpu).to(device), aligned.to(device))
        return out, ce_all.to(device), valid_all.to(device)


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
            raise ValueError(f"cache shard {shard!r}: {name} is {size} bytes, the manifest says {expected['bytes']} (truncated or missing); rebuild the cache")
        if _sha256_files([path]) != expected["sha256"]:
            raise ValueError(f"cache shard {shard!r}: {name} does not match its checksum (corrupted); rebuild the cache")
    table = datasets.load_from_disk(shard)
    if len(table) != manifest["rows"]:
        raise ValueError(f"cache shard {shard!r} holds {len(table)} rows, the manifest says {manifest['rows']}")
    return table


def cache_size(directory: str) -> int:
    """Bytes on disk of the cache's Arrow files."""
    return sum(os.path.getsize(p) for shard in list_shards(directory) for p in glob.glob(os.path.join(shard, "*.arrow")))
