"""Vocabulary map source -> student, cached on disk, and the sparse top-k projection through it.

`build_vocab_map` gives, for every output row of a source model, the student token that carries
its probability, or -1 (dropped). Tokens are compared as the bytes they spell (`token_bytes`),
so GPT-2's `Ġ`, SentencePiece's `▁` and `<0xNN>` pieces match plain text.

- Specials map by role: the source's pad, bos and eos go to the student's (in that order, so
  when one id has several roles, as GPT-2's `<|endoftext|>` does, eos wins). Other specials, and
  rows past len(tokenizer) (a model's padded output matrix), are dropped.
- `exact`: the student token spelling the same bytes. Where several do, a normal token beats a
  `<0xNN>` byte piece (the student's tokenizer never emits a byte piece for a byte it has a token
  for), then the lowest id wins.
- `med` (FuseLLM's MinED): the student token at the smallest Levenshtein distance over bytes;
  ties go to the longest common prefix with the source token, then to the lowest student id.
- `prefix`: the first student token of the source token's text as the student tokenizes it,
  kept when it spells a prefix of that text. When the student is finer (GPT-2 "52" -> char "5")
  this is the exact marginal: all the mass of "52" belongs to "5" as the next student token.
- Whatever none of these maps is dropped; its probability becomes the projection's tail.

Maps are cached on disk (`build_vocab_map`); the fusion module's default cache directory is the
per-user one of `default_cache_dir`, outside any repository or run directory.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein, Prefix
from safetensors.torch import load_file, save
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

from fusion.sources.alignment import BYTE_PIECE, fast_backend, special_ids, token_bytes, tokenizer_name
from fusion.utils.io import atomic_open, atomic_write_json

METHODS = ("exact+med", "exact+prefix", "exact")
RULES_VERSION = 1  # part of the fingerprint: a change to the rules above invalidates cached maps
DROPPED = -1
_ROLES = ("pad", "bos", "eos")  # assignment order: a later role overrides an earlier one on a shared id


def default_cache_dir() -> str:
    """Where vocabulary maps are cached when `model.vocab_map_dir` is not set, one directory per user:

        $FUSION_CACHE/vocab_maps               if FUSION_CACHE is set (fusion's cache root)
        $XDG_CACHE_HOME/fusion/vocab_maps      else, if XDG_CACHE_HOME is set
        ~/.cache/fusion/vocab_maps             else

    Read at each call (not at import), so a process can point it elsewhere before it loads sources.
    """
    if os.environ.get("FUSION_CACHE"):
        return os.path.join(os.environ["FUSION_CACHE"], "vocab_maps")
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache_home, "fusion", "vocab_maps")


def _exact_index(student: PreTrainedTokenizerBase, pieces: list[bytes | None]) -> dict[bytes, int]:
    """Student bytes -> id: normal tokens before `<0xNN>` byte pieces, then the lowest id."""
    backend = fast_backend(student)
    ids = [i for i, piece in enumerate(pieces) if piece]
    ids.sort(key=lambda i: (bool(BYTE_PIECE.fullmatch(backend.id_to_token(i) or "")), i))
    index: dict[bytes, int] = {}
    for i in ids:
        index.setdefault(pieces[i], i)
    return index


def _med(queries: list[bytes], pieces: list[bytes | None], chunk: int = 256) -> list[int]:
    """Nearest student token by Levenshtein distance over bytes; ties: longest common prefix, lowest id."""
    choice_ids = np.array([i for i, piece in enumerate(pieces) if piece])
    choices = [pieces[i] for i in choice_ids]
    longest = max(len(c) for c in choices) + max(len(q) for q in queries) + 1
    found = []
    for begin in range(0, len(queries), chunk):
        part = queries[begin : begin + chunk]
        distance = process.cdist(part, choices, scorer=Levenshtein.distance, workers=-1)  # [Q, C] int32
        shared = process.cdist(part, choices, scorer=Prefix.similarity, workers=-1)  # [Q, C] int32
        found.extend(choice_ids[np.argmin(distance * longest - shared, axis=1)].tolist())  # argmin: first = lowest id
    return found


def _prefix(queries: list[bytes], student: PreTrainedTokenizerBase, pieces: list[bytes | None]) -> list[int]:
    """The student's first token of each query's text, when it spells a prefix of the query."""
    backend = Tokenizer.from_str(fast_backend(student).to_str())
    backend.no_truncation()
    backend.no_padding()
    backend.encode_special_tokens = True
    found = [DROPPED] * len(queries)
    readable = [(n, q.decode()) for n, q in enumerate(queries) if _decodes(q)]
    encodings = backend.encode_batch_fast([text for _, text in readable], add_special_tokens=False)
    for (n, _), encoding in zip(readable, encodings):
        first = encoding.ids[0] if encoding.ids else None
        if first is not None and pieces[first] and queries[n].startswith(pieces[first]):
            found[n] = first
    return found


def _decodes(data: bytes) -> bool:
    try:
        data.decode()
        return True
    except UnicodeDecodeError:
        return False


def map_vocabulary(source: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase, source_rows: int, method: str) -> torch.Tensor:
    """The map of the module docstring, built from scratch ([source_rows] long, -1 dropped)."""
    if method not in METHODS:
        raise ValueError(f"vocabulary map method must be one of {METHODS}, got {method!r}")
    vocab_map = [DROPPED] * source_rows
    for role in _ROLES:
        source_id, student_id = getattr(source, f"{role}_token_id"), getattr(student, f"{role}_token_id")
        if source_id is not None and student_id is not None and source_id < source_rows:
            vocab_map[source_id] = student_id
    student_pieces = token_bytes(student)
    index = _exact_index(student, student_pieces)
    pieces = token_bytes(source)
    rest = []
    for i, piece in enumerate(pieces):
        if piece and piece in index:
            vocab_map[i] = index[piece]
        elif piece:
            rest.append(i)
    if rest and method != "exact":
        queries = [pieces[i] for i in rest]
        found = _med(queries, student_pieces) if method == "exact+med" else _prefix(queries, student, student_pieces)
        for i, student_id in zip(rest, found):
            vocab_map[i] = student_id
    return torch.tensor(vocab_map, dtype=torch.long)


def vocab_map_counts(vocab_map: torch.Tensor, source: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase) -> dict[str, int]:
    """How each source row maps: `special` (by role), `exact`, `fallback` (med or prefix), `dropped`."""
    source_pieces, student_pieces = token_bytes(source), token_bytes(student)
    specials = special_ids(source)
    counts = {"special": 0, "exact": 0, "fallback": 0, "dropped": 0}
    for i, target in enumerate(vocab_map.tolist()):
        if target == DROPPED:
            counts["dropped"] += 1
        elif i in specials:
            counts["special"] += 1
        elif source_pieces[i] == student_pieces[target]:
            counts["exact"] += 1
        else:
            counts["fallback"] += 1
    return counts


def fingerprint(source: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase, source_rows: int, method: str) -> str:
    """sha256 of both tokenizers (backend JSON and special roles), the method and the source's rows."""
    digest = hashlib.sha256()
    for tokenizer in (source, student):
        digest.update(fast_backend(tokenizer).to_str().encode())
        digest.update(json.dumps([getattr(tokenizer, f"{role}_token_id") for role in _ROLES]).encode())
    digest.update(f"{method}/{source_rows}/{RULES_VERSION}".encode())
    return digest.hexdigest()


def build_vocab_map(
    source: PreTrainedTokenizerBase,
    student: PreTrainedTokenizerBase,
    source_rows: int,
    method: str = "exact+med",
    cache_dir: str | None = None,
) -> torch.Tensor:
    """Source row -> student id or -1 ([source_rows] long); cached under `cache_dir` when given.

    The cache is `vocab_map-<fingerprint>.safetensors` with a JSON beside it (both tokenizers'
    names, the method, the rows and the counts, for people); a second call with the same
    tokenizers, method and rows loads it instead of building it.
    """
    if source_rows < len(source):
        raise ValueError(
            f"source {tokenizer_name(source)!r}: {source_rows} output rows for a tokenizer of {len(source)} tokens; "
            "a model needs a row per token (config.vocab_size >= len(tokenizer))"
        )
    if cache_dir is None:
        return map_vocabulary(source, student, source_rows, method)
    key = fingerprint(source, student, source_rows, method)
    path = os.path.join(cache_dir, f"vocab_map-{key[:16]}")
    if os.path.isfile(path + ".safetensors"):
        return load_file(path + ".safetensors")["vocab_map"]
    vocab_map = map_vocabulary(source, student, source_rows, method)
    os.makedirs(cache_dir, exist_ok=True)
    summary = {
        "fingerprint": key,
        "source": tokenizer_name(source),
        "student": tokenizer_name(student),
        "method": method,
        "source_rows": source_rows,
        "counts": vocab_map_counts(vocab_map, source, student),
    }
    atomic_write_json(path + ".json", summary)
    with atomic_open(path + ".safetensors", "wb") as f:
        f.write(save({"vocab_map": vocab_map}, metadata={"fingerprint": key}))
    return vocab_map


def project_dense(source_logprobs: torch.Tensor, vocab_map: torch.Tensor, student_vocab: int) -> torch.Tensor:
    """The source's whole distribution carried onto the student's vocabulary: each student id's
    log-probability is the logsumexp over the source tokens that map to it (-inf where none do;
    unmapped source tokens' mass is dropped, as in `project_topk`). [..., V_source] -> [..., V_student]
    """
    mapped = vocab_map.to(source_logprobs.device)
    keep = mapped != DROPPED
    probs = source_logprobs[..., keep].float().exp()
    dense = torch.zeros(*source_logprobs.shape[:-1], student_vocab, device=source_logprobs.device)
    dense.index_add_(dense.dim() - 1, mapped[keep], probs)
    return dense.log()


def project_topk(source_logprobs: torch.Tensor, vocab_map: torch.Tensor, k: int, oversample: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """The source's distribution carried onto the student's vocabulary, as its k most likely student ids.

    `source_logprobs` are log-probabilities (log_softmax of the source's logits). Takes the source's top k*oversample tokens, maps them through `vocab_map`, drops unmapped ones,
    adds up (logsumexp) the probabilities of source tokens landing on the same student id, and
    returns the k most likely student ids ([..., k] long) with their log-probs ([..., k] float),
    padded with id -1 and log-prob -inf where fewer exist. No [..., V_student] tensor is built.
    The mass left out, 1 - sum(exp(logprobs)), is the tail: dropped tokens, tokens outside the
    source's top k*oversample, and student ids beyond the k-th; a caller may renormalize or keep
    it as a tail term.
    """
    width = min(source_logprobs.shape[-1], k * oversample)
    logprobs, source_ids = source_logprobs.float().topk(width, dim=-1)  # [..., W]
    return merge_by_student_id(vocab_map.to(source_ids.device)[source_ids], logprobs, k)


def merge_by_student_id(ids: torch.Tensor, logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates [..., W] (student ids, -1 dropped, and log-probs) -> the k most likely student ids
    [..., k] with the logsumexp of their candidates' log-probs, padded with -1 and -inf."""
    width = ids.shape[-1]
    logprobs = logprobs.masked_fill(ids == DROPPED, float("-inf"))
    ids, order = ids.sort(dim=-1)
    logprobs = logprobs.gather(-1, order)
    # Equal student ids are now adjacent: number the runs, then logsumexp within each run.
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[..., 1:] = ids[..., 1:] != ids[..., :-1]
    run = starts.long().cumsum(-1) - 1  # [..., W]
    peak = torch.full_like(logprobs, float("-inf")).scatter_reduce(-1, run, logprobs, "amax")
    peak = peak.masked_fill(peak.isinf(), 0.0)  # empty runs: exp(-inf - 0) = 0, never nan
    total = torch.zeros_like(logprobs).scatter_add(-1, run, (logprobs - peak.gather(-1, run)).exp())
    run_logprobs = total.log() + peak  # [..., W], -inf for unused runs
    run_ids = torch.full_like(ids, DROPPED).scatter(-1, run, ids)
    run_logprobs = run_logprobs.masked_fill(run_ids == DROPPED, float("-inf"))
    top_logprobs, top = run_logprobs.topk(min(k, width), dim=-1)  # [..., k]
    top_ids = run_ids.gather(-1, top).masked_fill(top_logprobs.isinf(), DROPPED)
    if width < k:
        pad = (*top_ids.shape[:-1], k - width)
        top_ids = torch.cat([top_ids, top_ids.new_full(pad, DROPPED)], dim=-1)
        top_logprobs = torch.cat([top_logprobs, top_logprobs.new_full(pad, float("-inf"))], dim=-1)
    return top_ids, top_logprobs
