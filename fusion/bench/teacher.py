"""The fused teacher: how well sources that know a domain imperfectly answer together.

    python -m fusion.bench teacher --domain word_sorting --sources checkpoints/zoo/word_sorting-llama-a \\
        checkpoints/zoo/word_sorting-qwen2-b checkpoints/zoo/word_sorting-llama-bpe [--test_size 200]

For each source: its own greedy accuracy on the domain's test prompts (its tokens), and the same
source decoded one student token at a time from its distribution read over the student's
vocabulary (`fusion.sources.fused_decoding`: exact for a source with the student's tokenizer; a
source with another tokenizer is read along the canonical split of the text so far, which its
own greedy path need not follow). Then every group of two or more sources, fused with equal
weights: the accuracy a student distilled from their mixture could reach, and its ratio to the
best source alone. Writes report.md (with its command, commit and machine) under `--output`.
"""

from __future__ import annotations

import argparse
import itertools
import os

import torch


def group_accuracy(pool, group: tuple[int, ...], rows: list[dict], student_tokenizer, max_new_tokens: int) -> tuple[float, dict]:
    """The exact-match accuracy on `rows` of the sources `group` of `pool` decoding together with
    equal weights (`fused_greedy`), and its record (steps, renormalised, forwards per token)."""
    from fusion.sources.fused_decoding import fused_greedy
    from fusion.stages.evaluation import correct

    selected = torch.tensor(group).repeat(len(rows), 1)
    prompts = [r["prompt"] for r in rows]
    answers, record = fused_greedy(pool, prompts, selected, torch.ones(selected.shape), student_tokenizer, max_new_tokens)
    return sum(correct(answers, rows)) / len(rows), record


def fused_teacher(sources: list[str], student: str, rows: list[dict], max_new_tokens: int, **load) -> tuple[float, dict]:
    """`group_accuracy` of all `sources` (paths; `load`: `SourcePool.load`'s dtype, trust_remote_code)."""
    from fusion.data.tokenizer import load_tokenizer
    from fusion.sources.pool import SourcePool

    student_tokenizer = load_tokenizer(student)
    pool = SourcePool.load(sources, student_tokenizer, unaligned="marginal", boundary="prefix", **load)
    return group_accuracy(pool, tuple(range(len(sources))), rows, student_tokenizer, max_new_tokens)


def measure(sources: list[str], student: str, domain: str, test_size: int, max_new_tokens: int, seed: int = 0) -> dict:
    from fusion.data import tasks
    from fusion.data.tokenizer import load_tokenizer
    from fusion.sources.pool import SourcePool, source_name
    from fusion.stages.evaluation import model_accuracy

    student_tokenizer = load_tokenizer(student)
    rows = tasks.build_splits([domain], {"test": test_size}, seed)["test"]
    pool = SourcePool.load(sources, student_tokenizer, unaligned="marginal", boundary="prefix")

    def fused_accuracy(group: tuple[int, ...]) -> tuple[float, dict]:
        return group_accuracy(pool, group, rows, student_tokenizer, max_new_tokens)

    alone = {}
    for index, name in enumerate(map(source_name, sources)):
        own = model_accuracy(pool.models[index], pool.tokenizers[index], rows, max_new_tokens)[domain]
        alone[name] = {"own": own, "read_by_student_token": fused_accuracy((index,))[0]}
    best = max(v["own"] for v in alone.values())
    groups = {}
    for size in range(2, len(sources) + 1):
        for group in itertools.combinations(range(len(sources)), size):
            accuracy, record = fused_accuracy(group)
            names = " + ".join(pool.names[i] for i in group)
            groups[names] = {"accuracy": accuracy, "ratio_to_best_source": accuracy / best if best > 0 else None, **record}
    return {"domain": domain, "test_size": test_size, "sources": alone, "fused": groups}


def print_tables(report: dict) -> None:
    print(f"{report['domain']}, {report['test_size']} test prompts: each source alone")
    print()
    print("| source | own greedy | read per student token |")
    print("|---|---|---|")
    for name, acc in report["sources"].items():
        print(f"| {name} | {acc['own']:.3f} | {acc['read_by_student_token']:.3f} |")
    print()
    print("fused with equal weights, greedy per student token")
    print()
    print("| sources | accuracy | / best source alone | source forwards per token | steps renormalised |")
    print("|---|---|---|---|---|")
    for names, entry in report["fused"].items():
        ratio = "n/a" if entry["ratio_to_best_source"] is None else f"{entry['ratio_to_best_source']:.2f}"
        print(f"| {names} | {entry['accuracy']:.3f} | {ratio} | {entry['source_forwards_per_token']} | {entry['renormalised']} |")


def main(argv: list[str] | None = None) -> None:
    from fusion.bench._quality_report import printed_report
    from fusion.utils.io import atomic_write_json

    parser = argparse.ArgumentParser(prog="python -m fusion.bench teacher", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", nargs="+", required=True, help="two or more source model directories")
    parser.add_argument("--domain", required=True, help="the task domain their test prompts come from")
    parser.add_argument("--student", default="checkpoints/zoo/student", help="whose tokens the fused teacher speaks")
    parser.add_argument("--test_size", type=int, default=200)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--output", default=None, help="default: checkpoints/bench/teacher/<domain>")
    args = parser.parse_args(argv)
    if len(args.sources) < 2:
        parser.error("--sources: give two or more sources to fuse")
    torch.manual_seed(0)
    output = args.output or f"checkpoints/bench/teacher/{args.domain}"
    with printed_report("python -m fusion.bench teacher", list(argv or []), f"The fused teacher on {args.domain}") as report:
        report["output"] = output
        os.makedirs(output, exist_ok=True)
        result = measure(args.sources, args.student, args.domain, args.test_size, args.max_new_tokens)
        print_tables(result)
        atomic_write_json(f"{output}/report.json", {"provenance": report["provenance"], **result})
