"""`python -m fusion.bench alignment`: speed and coverage of alignment, and the vocabulary maps.

The student is the char tokenizer; the sources are the char tokenizer, the real GPT-2 tokenizer
and a byte-level BPE trained on the suite's train split. Printed:

- alignment tokens/s (student tokens, attention mask) for each source, cold (every text
  tokenized by the source) and cached (the best of three more epochs over the same texts);
- coverage of exact alignment (aligned / trained student positions) per source and domain;
- vocabulary-map counts per method and pair, and, per method, the share of aligned trained
  positions where the source's gold next token maps to the student's gold next token (the mass
  a perfectly confident source would put on the right student token);
- the offline cache's size on disk in bytes per trained token per source at K = 10, written by
  `fusion.cache.write_shard` for these rows, for a small and a large student vocabulary
  (FuseLLM stores 60: K float16 log-probs and K int32 ids for every token).
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
from jsonargparse import CLI

from fusion import tasks
from fusion.alignment import Aligner
from fusion.data import IGNORE_INDEX, collate, encode
from fusion.tokenizer import build_char_tokenizer, build_gpt2_tokenizer, train_bpe_tokenizer
from fusion.vocab_map import METHODS, build_vocab_map, vocab_map_counts


def gold_agreement(batches: list[dict], aligner: Aligner, vocab_map: torch.Tensor) -> float:
    """Share of aligned trained positions where the mapped source gold token is the student's gold token."""
    hits = total = 0
    for batch in batches:
        out = aligner(batch["input_ids"], batch["attention_mask"], batch["targets"])
        keep = (batch["targets"] != IGNORE_INDEX) & (out.position_map >= 0)  # [B, T]
        source_next = out.input_ids.gather(1, (out.position_map + 1).clamp(min=0, max=out.input_ids.shape[1] - 1))  # [B, T]
        hits += int((vocab_map[source_next] == batch["targets"])[keep].sum())
        total += int(keep.sum())
    return hits / max(total, 1)


def run(train_size: int = 200, batch_size: int = 32, max_length: int = 64, bpe_vocab_size: int = 400, seed: int = 0) -> None:
    """Measure on `train_size` suite examples per domain, batches of `batch_size`, rows of `max_length` tokens."""
    rows = tasks.build_splits(tasks.DEFAULT_DOMAINS, {"train": train_size}, seed)["train"]
    student = build_char_tokenizer()
    sources = {
        "char": build_char_tokenizer(),
        "gpt2": build_gpt2_tokenizer(),
        f"bpe{bpe_vocab_size}": train_bpe_tokenizer([r["prompt"] + r["response"] for r in rows], bpe_vocab_size),
    }

    def batches_of(tokenizer) -> list[dict]:
        features = [dict(encode(tokenizer, r["prompt"], r["response"], max_length), row=r) for r in rows]
        return [collate(features[i : i + batch_size], tokenizer.pad_token_id) for i in range(0, len(features), batch_size)]

    batches = batches_of(student)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    print(f"{len(rows)} rows, {tokens} student tokens, batches of {batch_size}\n")

    print(f"{'source':>8} {'cold tok/s':>12} {'cached tok/s':>13}")
    for name, source in sources.items():
        aligner = Aligner(student, source)
        speeds = []
        for _ in range(4):  # the first epoch tokenizes, the others read the cache
            start = time.perf_counter()
            for batch in batches:
                aligner(batch["input_ids"], batch["attention_mask"], batch["targets"])
            speeds.append(tokens / (time.perf_counter() - start))
        print(f"{name:>8} {speeds[0]:>12,.0f} {max(speeds[1:]):>13,.0f}")

    print("\ncoverage (aligned / trained student positions)")
    domains = sorted({r["domain"] for r in rows})
    print(f"{'source':>8} " + " ".join(f"{d:>24}" for d in domains) + f" {'all':>8}")
    for name, source in sources.items():
        aligner = Aligner(student, source)
        counts = defaultdict(lambda: [0, 0])
        for batch in batches:
            out = aligner(batch["input_ids"], batch["attention_mask"], batch["targets"])
            for row, aligned, trained in zip(batch["rows"], out.aligned.tolist(), out.trained.tolist()):
                for key in (row["domain"], "all"):
                    counts[key][0] += aligned
                    counts[key][1] += trained
        cells = [f"{counts[d][0] / counts[d][1]:>7.1%} ({counts[d][0]:>5}/{counts[d][1]:>5})" for d in domains]
        print(f"{name:>8} " + " ".join(f"{c:>24}" for c in cells) + f" {counts['all'][0] / counts['all'][1]:>8.1%}")

    print("\nvocabulary maps source -> student (rows = len(source tokenizer))")
    pairs = [("gpt2", "char"), (f"bpe{bpe_vocab_size}", "char"), ("char", "char"), ("char", "gpt2")]
    print(f"{'pair':>16} {'method':>13} {'special':>8} {'exact':>7} {'fallback':>9} {'dropped':>8} {'gold agreement':>15}")
    for source_name, student_name in pairs:
        source, pair_student = sources[source_name], sources[student_name]
        pair_batches, aligner = batches_of(pair_student), Aligner(pair_student, source)
        for method in METHODS:
            vocab_map = build_vocab_map(source, pair_student, len(source), method)
            counts = vocab_map_counts(vocab_map, source, pair_student)
            agreement = gold_agreement(pair_batches, aligner, vocab_map)
            print(
                f"{source_name + '->' + student_name:>16} {method:>13} {counts['special']:>8} {counts['exact']:>7} "
                f"{counts['fallback']:>9} {counts['dropped']:>8} {agreement:>15.1%}"
            )


    import datasets

    datasets.disable_progress_bars()
    trained = sum(int((b["targets"] != IGNORE_INDEX).sum()) for b in batches)
    print(f"\noffline cache on disk, K = 10, 3 sources, these rows ({trained} of {tokens} tokens are trained and stored)")
    for vocab_size in (len(student), 151_936):
        per_token = cache_bytes_per_token(batches, vocab_size, sources=3, top_k=10)
        print(f"  student vocabulary {vocab_size:>7}: {per_token:.1f} bytes per trained token per source ({per_token / 60:.2f} x FuseLLM's 60), "
              f"{per_token * trained / tokens:.1f} per corpus token ({per_token * trained / tokens / 60:.2f} x)")


def cache_bytes_per_token(batches: list[dict], vocab_size: int, sources: int, top_k: int) -> float:
    """Write a cache of random top-K entries for every trained position and measure its Arrow files."""
    import tempfile

    from fusion.cache import cache_size, rows_to_records, write_shard
    from fusion.sources import SourceOutputs

    generator = torch.Generator().manual_seed(0)
    records, trained = [], 0
    for batch in batches:
        size, length = batch["input_ids"].shape
        shape = (size, sources, length, top_k)
        out = SourceOutputs(torch.randint(0, vocab_size, shape, generator=generator), -torch.rand(shape, generator=generator) * 10,
                            torch.rand(size, sources, generator=generator), torch.ones(size, sources, dtype=torch.bool),
                            torch.ones(size, sources, length, dtype=torch.bool))
        records += rows_to_records(batch, out, torch.arange(sources).expand(size, -1))
        trained += int((batch["targets"] != IGNORE_INDEX).sum())
    with tempfile.TemporaryDirectory() as directory:
        write_shard(directory, "shard-r0-00000", records, vocab_size)
        return cache_size(directory) / (trained * sources)


def main(argv: list[str]) -> None:
    CLI(run, args=argv)
