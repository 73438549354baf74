"""`python -m fusion.bench alignment`: speed and coverage of alignment, and the vocabulary maps.

The student is the char tokenizer; the sources are the char tokenizer, the real GPT-2 tokenizer
(up to three digits per token), and two byte-level BPEs trained on the suite's train split, one
of them splitting every digit (as Qwen's tokenizers do). Printed:

- per source and unaligned policy (mask, gold_onehot, marginal): coverage (trained student
  positions where the source gives a distribution), gold agreement (the share of trained
  positions where the most likely next student token of a source that knows the text, one
  certain of each of its next tokens, is the gold one; counted over all trained positions, so a
  position without a distribution is a miss), and tokens/s of alignment plus projection onto
  the student's vocabulary for those certain log-probs (`mask` is today's exact-boundary
  alignment; the others add their fill). Also per domain, and for a student coarser than the
  source (GPT-2 student, char source). Written to `--output`/report.json;
- with `--zoo`, for the zoo's sources with another tokenizer, the mean probability mass of the
  whole next-student-token distribution and of its K = 10 most likely student tokens (what the
  cache stores), at shared boundaries and inside source tokens;

- alignment tokens/s (student tokens, attention mask) for each source, cold (every text
  tokenized by the source) and cached (the best of three more epochs over the same texts);
- coverage of exact alignment (aligned / trained student positions) per source and domain;
- vocabulary-map counts per method and pair, and, per method, the share of aligned trained
  positions where the source's gold next token maps to the student's gold next token (the mass
  a perfectly confident source would put on the right student token);
- the offline cache's size on disk in bytes per trained token per source at K = 10, written by
  `fusion.sources.cache.write_shard` for these rows, for a small and a large student vocabulary
  (FuseLLM stores 60: K float16 log-probs and K int32 ids for every token).

Everything printed is also written to `--output`/report.md, after its command, commit and machine.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from types import SimpleNamespace

import torch
from jsonargparse import CLI

from fusion.data import IGNORE_INDEX, tasks
from fusion.data.datamodule import collate, encode
from fusion.data.tokenizer import build_char_tokenizer, build_gpt2_tokenizer, train_bpe_tokenizer
from fusion.sources.alignment import Aligner
from fusion.sources.pool import UNALIGNED_POLICIES, SourcePool
from fusion.sources.vocab_map import METHODS, build_vocab_map, vocab_map_counts
from fusion.utils.io import atomic_write_json


class TextOracle(torch.nn.Module):
    """A causal LM that knows the text: at every position it is certain (`confidence` logits above
    every other token) of the next token of its input. It computes only the logits asked for."""

    def __init__(self, rows: int, confidence: float = 50.0):
        super().__init__()
        self.head = torch.nn.Linear(1, rows, bias=False)  # only its shape is read: the output rows
        self.confidence = confidence

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: torch.Tensor) -> SimpleNamespace:
        following = input_ids.roll(-1, dims=1)[logits_to_keep]  # [Q]
        logits = torch.zeros(len(following), self.head.weight.shape[0])
        logits[torch.arange(len(following)), following] = self.confidence
        return SimpleNamespace(logits=logits)


def policy_table(student, sources: dict, batches: list[dict], domains: list[str], repeats: int = 5) -> dict:
    """Coverage, gold agreement and tokens/s per source and policy, for sources that know the text.
    The policies of one source are timed in turns (the best of `repeats` epochs each), so that a
    load on the machine that comes and goes does not favour one of them."""
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    report = {}
    for name, source in sources.items():
        pools = {p: SourcePool([TextOracle(len(source))], [source], [name], student, top_k=10, unaligned=p) for p in UNALIGNED_POLICIES}
        selected = [torch.zeros(len(b["input_ids"]), 1, dtype=torch.long) for b in batches]
        outputs = {p: [pool.run(s, b) for s, b in zip(selected, batches)] for p, pool in pools.items()}  # warm: tokenization cached
        seconds = defaultdict(list)
        for _ in range(repeats):
            for policy, pool in pools.items():
                start = time.perf_counter()
                for s, b in zip(selected, batches):
                    pool.run(s, b)
                seconds[policy].append(time.perf_counter() - start)
        boundaries = [pools["mask"].aligners[0](b["input_ids"], b["attention_mask"], b["targets"]).position_map >= 0 for b in batches]
        for policy in UNALIGNED_POLICIES:
            counts = defaultdict(lambda: [0, 0, 0])  # covered, agreeing, trained
            inside = [0, 0]  # agreeing, trained: positions without a shared boundary
            for batch, out, boundary in zip(batches, outputs[policy], boundaries):
                trained = batch["targets"] != IGNORE_INDEX
                covered = out.aligned[:, 0] & trained
                agrees = covered & (out.ids[:, 0, :, 0] == batch["targets"])
                inside = [inside[0] + int((agrees & ~boundary).sum()), inside[1] + int((trained & ~boundary).sum())]
                for row, c, a, t in zip(batch["rows"], covered.sum(1).tolist(), agrees.sum(1).tolist(), trained.sum(1).tolist()):
                    for key in (row["domain"], "all"):
                        counts[key] = [counts[key][0] + c, counts[key][1] + a, counts[key][2] + t]
            report.setdefault(name, {})[policy] = {
                "coverage": counts["all"][0] / counts["all"][2],
                "gold_agreement": counts["all"][1] / counts["all"][2],
                "gold_agreement_inside": inside[0] / inside[1] if inside[1] else None,  # over the positions without a shared boundary
                "tokens_per_second": tokens / min(seconds[policy]),
                "domains": {d: {"coverage": counts[d][0] / counts[d][2], "gold_agreement": counts[d][1] / counts[d][2]} for d in domains},
            }
    return report


def print_policy_table(report: dict, domains: list[str]) -> None:
    print(
        f"{'source':>14} {'policy':>12} {'coverage':>9} {'gold agreement':>15} {'inside':>7} {'tok/s':>10} {'x mask':>7}  "
        + " ".join(f"{d[:22]:>22}" for d in domains)
    )
    for name, policies in report.items():
        for policy, row in policies.items():
            ratio = row["tokens_per_second"] / policies["mask"]["tokens_per_second"]
            cells = " ".join(f"{row['domains'][d]['coverage']:>10.1%} {row['domains'][d]['gold_agreement']:>11.1%}" for d in domains)
            print(
                f"{name:>14} {policy:>12} {row['coverage']:>9.1%} {row['gold_agreement']:>15.1%} {'-' if row['gold_agreement_inside'] is None else format(row['gold_agreement_inside'], '.1%'):>7} "
                f"{row['tokens_per_second']:>10,.0f} {ratio:>7.2f}  {cells}"
            )
    print("(gold agreement over all trained positions; inside: over those without a shared boundary; per domain: coverage, gold agreement)")


def top_k_mass(zoo: str, batches: list[dict], student, top_k: int = 10) -> dict:
    """For each zoo source with another tokenizer (the marginal policy, online): the mean mass of
    the whole next-student-token distribution (below 1 inside a source token by the share of the
    token equal to the spelled bytes, the tail) and of its `top_k` most likely student tokens (what
    the cache stores), at shared boundaries and inside source tokens."""
    names = [n for n in sorted(os.listdir(zoo)) if os.path.isfile(os.path.join(zoo, n, "config.json")) and n != "student"]
    paths = [os.path.join(zoo, n) for n in names]
    pools = {k: SourcePool.load(paths, student, top_k=k, unaligned="marginal") for k in (top_k, len(student))}
    result = {}
    for index, name in enumerate(pools[top_k].names):
        if pools[top_k].aligners[index] is None:
            continue
        sums = defaultdict(float)
        for batch in batches:
            side = pools[top_k].aligners[index](batch["input_ids"], batch["attention_mask"], batch["targets"])
            selected = torch.full((len(batch["input_ids"]), 1), index)
            for k, pool in pools.items():
                out = pool.run(selected, batch)
                mass = out.logprobs[:, 0].exp().sum(-1)  # [B, T]
                trained = (batch["targets"] != IGNORE_INDEX) & out.aligned[:, 0]
                for kind, where in (("boundary", trained & (side.position_map >= 0)), ("inside", trained & (side.position_map < 0))):
                    sums[kind, "top" if k == top_k else "whole"] += float(mass[where].sum())
                    sums[kind, "count"] += int(where.sum()) if k == top_k else 0
        result[name] = {
            f"{kind}_{part}": sums[kind, part] / max(sums[kind, "count"], 1) for kind in ("boundary", "inside") for part in ("whole", "top")
        }
    return result


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


def run(
    train_size: int = 200,
    batch_size: int = 32,
    max_length: int = 64,
    bpe_vocab_size: int = 400,
    seed: int = 0,
    output: str = "checkpoints/bench/alignment",
    zoo: str | None = None,
) -> str:
    """Measure on `train_size` suite examples per domain, batches of `batch_size`, rows of `max_length` tokens;
    with `zoo` (a model zoo's directory), also the top-K mass of its sources. Returns `output`."""
    rows = tasks.build_splits(tasks.DEFAULT_DOMAINS, {"train": train_size}, seed)["train"]
    student = build_char_tokenizer()
    texts = [r["prompt"] + r["response"] for r in rows]
    sources = {
        "char": build_char_tokenizer(),
        "gpt2": build_gpt2_tokenizer(),
        f"bpe{bpe_vocab_size}": train_bpe_tokenizer(texts, bpe_vocab_size),
        f"bpe{bpe_vocab_size}-digits": train_bpe_tokenizer(texts, bpe_vocab_size, split_digits=True),
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

    domains = sorted({r["domain"] for r in rows})
    print("\nper unaligned policy, sources that know the text (certain of each next token); tok/s: alignment + projection")
    report = {
        "student": "char",
        "rows": len(rows),
        "sources": policy_table(student, {k: v for k, v in sources.items() if k != "char"}, batches, domains),
    }
    print_policy_table(report["sources"], domains)
    print("\nstudent coarser than the source (GPT-2 student, char source)")
    report["coarser"] = policy_table(sources["gpt2"], {"char": sources["char"]}, batches_of(sources["gpt2"]), domains)
    print_policy_table(report["coarser"], domains)
    if zoo:
        print(f"\nmean probability mass per trained position, whole distribution and its top 10 student tokens (marginal policy, {zoo})")
        report["top_k_mass"] = top_k_mass(zoo, batches, student)
        print(f"{'source':>30} {'boundary: whole':>16} {'top 10':>7} {'inside: whole':>14} {'top 10':>7}")
        for name, row in report["top_k_mass"].items():
            print(
                f"{name:>30} {row['boundary_whole']:>16.3f} {row['boundary_top']:>7.3f} {row['inside_whole']:>14.3f} {row['inside_top']:>7.3f}"
            )
    os.makedirs(output, exist_ok=True)
    atomic_write_json(os.path.join(output, "report.json"), report)
    print(f"wrote {os.path.join(output, 'report.json')}")

    print("\nvocabulary maps source -> student (rows = len(source tokenizer))")
    pairs = [
        ("gpt2", "char"),
        (f"bpe{bpe_vocab_size}", "char"),
        (f"bpe{bpe_vocab_size}-digits", "char"),
        ("char", "char"),
        ("char", "gpt2"),
    ]
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
        print(
            f"  student vocabulary {vocab_size:>7}: {per_token:.1f} bytes per trained token per source ({per_token / 60:.2f} x FuseLLM's 60), "
            f"{per_token * trained / tokens:.1f} per corpus token ({per_token * trained / tokens / 60:.2f} x)"
        )
    return output


def cache_bytes_per_token(batches: list[dict], vocab_size: int, sources: int, top_k: int) -> float:
    """Write a cache of random top-K entries for every trained position and measure its Arrow files."""
    import tempfile

    from fusion.sources.cache import cache_size, rows_to_records, write_shard
    from fusion.sources.pool import SourceOutputs

    generator = torch.Generator().manual_seed(0)
    records, trained = [], 0
    for batch in batches:
        size, length = batch["input_ids"].shape
        shape = (size, sources, length, top_k)
        out = SourceOutputs(
            torch.randint(0, vocab_size, shape, generator=generator),
            -torch.rand(shape, generator=generator) * 10,
            torch.rand(size, sources, generator=generator),
            torch.ones(size, sources, dtype=torch.bool),
            torch.ones(size, sources, length, dtype=torch.bool),
        )
        records += rows_to_records(batch, out, torch.arange(sources).expand(size, -1))
        trained += int((batch["targets"] != IGNORE_INDEX).sum())
    with tempfile.TemporaryDirectory() as directory:
        write_shard(directory, "shard-r0-00000", records, vocab_size)
        return cache_size(directory) / (trained * sources)


def main(argv: list[str]) -> None:
    from fusion.bench._quality_report import printed_report

    with printed_report("python -m fusion.bench alignment", argv, "Alignment: speed, coverage, vocabulary maps, cache size") as report:
        report["output"] = CLI(run, args=argv)
