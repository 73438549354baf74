"""Does a source's target at a position read the token written there?

    python -m fusion.bench lookahead --config configs/bench_unlabeled.yaml [--pool A] [--rows N]

The exact next-token target at a student position reads only the text before the token it
predicts. Along a gold answer it makes no difference; along the student's own sample (on-policy),
a target that reads the written token lets a wrong sample choose its own target. For each source
of the pool, on the bench's labelled rows, this writes another token at `--per_row` answer
positions of each row (a token drawn from the same answer, so a plausible mistake; the text
after it is the gold's) and compares the source's distribution at each such position, the one
that predicts the changed token, with the same position along the unchanged row. Both read the
same text before it, so an exact target gives the same distribution: the printed total variation
(TV, on the union of both supports plus the tail) is 0. It is, for a source with the student's
tokenizer. For a source with another tokenizer (`model.unaligned: marginal`, each
`model.boundary` of `fusion.sources.marginal`), the table also splits the positions by whether
the source's tokenizer ends its tokens before the position at the same places in both rows: BPE
merges read ahead, so the written token can change how the text before it is split, and with it
the context the source is read in.

Writes `report.json` under `--output`.
"""

from __future__ import annotations

import random
import sys

import torch

from fusion.utils.io import atomic_write_json

BOUNDARIES = ("token_end", "prefix")


def _changed_rows(batch: dict, per_row: int, rng: random.Random) -> tuple[dict, list[tuple[int, int]]]:
    """Each row of `batch`, then one copy per changed position: -> (both, [(row, position)]).

    A copy writes another token of the same answer at `position + 1` (the token that position
    predicts), and keeps the rest of the row."""
    from fusion.data import IGNORE_INDEX

    input_ids, mask, targets = batch["input_ids"], batch["attention_mask"], batch["targets"]
    copies, changed = [], []
    for row in range(len(input_ids)):
        trained = (targets[row] != IGNORE_INDEX).nonzero(as_tuple=True)[0].tolist()[:-1]  # the eos stays
        answer = sorted(set(targets[row, trained].tolist()))
        for position in rng.sample(trained, min(per_row, len(trained))):
            others = [t for t in answer if t != int(targets[row, position])]
            if not others:
                continue
            token = rng.choice(others)
            ids, tgt = input_ids[row].clone(), targets[row].clone()
            ids[position + 1], tgt[position] = token, token
            copies.append((ids, mask[row], tgt))
            changed.append((row, position))
    both = {
        "input_ids": torch.cat([input_ids, torch.stack([c[0] for c in copies])]),
        "attention_mask": torch.cat([mask, torch.stack([c[1] for c in copies])]),
        "targets": torch.cat([targets, torch.stack([c[2] for c in copies])]),
    }
    return both, changed


def _distribution(ids: torch.Tensor, probs: torch.Tensor) -> dict[int, float]:
    """One position of a `SparseTarget` (each id at most once) as token -> probability."""
    return {token: p for token, p in zip(ids.tolist(), probs.tolist()) if token >= 0}


def total_variation(a: dict[int, float], b: dict[int, float]) -> float:
    """TV between two sparse distributions (token -> probability), their missing mass one tail bucket."""
    tails = abs((1.0 - sum(a.values())) - (1.0 - sum(b.values())))
    return 0.5 * (sum(abs(a.get(t, 0.0) - b.get(t, 0.0)) for t in set(a) | set(b)) + tails)


def _splits_before(student, source, ids: torch.Tensor, position: int) -> list[int]:
    """Where `source` ends its tokens before the text that student position `position` predicts,
    reading the whole row's text (as the alignment does): character offsets."""
    text = student.decode(ids, skip_special_tokens=True)
    before = len(student.decode(ids[: position + 1], skip_special_tokens=True))
    return [end for _, end in source(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"] if end <= before]


def measure(pool, batches: list[dict], per_row: int, student, temperature: float = 1.0, seed: int = 0) -> dict:
    """-> {source: {boundary: [(TV, whether the source splits the text before the position
    differently in the two rows)]}}, at the changed positions where both rows have the source's
    distribution. `student`: the student's tokenizer."""
    from fusion.objectives.fusion_rule import fused_target

    results = {name: {b: [] for b in BOUNDARIES} for name in pool.names}
    rng, setting = random.Random(seed), pool.boundary
    pairs = [_changed_rows(batch, per_row, rng) for batch in batches]
    texts = [[ids[m.bool()] for ids, m in zip(both["input_ids"], both["attention_mask"])] for both, _ in pairs]  # unpadded
    try:
        for index, name in enumerate(pool.names):
            source = pool.tokenizers[index]
            for (both, changed), real in zip(pairs, texts):
                rows = len(real) - len(changed)
                split = [
                    _splits_before(student, source, real[row], p) != _splits_before(student, source, real[copy], p)
                    for copy, (row, p) in enumerate(changed, start=rows)
                ]
                for boundary in BOUNDARIES:
                    pool.boundary = boundary
                    out = pool.run(torch.full((len(real), 1), index), both, temperature)
                    target = fused_target(out.ids, out.logprobs, torch.ones(len(real), 1), out.aligned)
                    for copy, (row, position) in enumerate(changed, start=rows):
                        if out.aligned[row, 0, position] and out.aligned[copy, 0, position]:
                            results[name][boundary].append(
                                (
                                    total_variation(
                                        _distribution(target.ids[row, position], target.probs[row, position]),
                                        _distribution(target.ids[copy, position], target.probs[copy, position]),
                                    ),
                                    split[copy - rows],
                                )
                            )
    finally:
        pool.boundary = setting  # the pool as it came, also when a source fails
    return results


def summary(found: list[tuple[float, bool]]) -> dict:
    if not found:
        return {"positions": 0}
    t, split = torch.tensor([tv for tv, _ in found]), torch.tensor([s for _, s in found])

    def mean(values: torch.Tensor) -> float | None:
        return float(values.mean()) if len(values) else None

    return {
        "positions": len(t),
        "mean_tv": float(t.mean()),
        "share_above_0.05": float((t > 0.05).float().mean()),
        "share_above_0.3": float((t > 0.3).float().mean()),
        "share_split_differs": float(split.float().mean()),
        "mean_tv_split_differs": mean(t[split]),
        "mean_tv_same_split": mean(t[~split]),
    }


def main(argv: list[str] | None = None) -> dict:
    import os

    import yaml
    from jsonargparse import ArgumentParser

    from fusion.data.datamodule import FusionDataModule
    from fusion.data.tokenizer import load_tokenizer
    from fusion.sources.pool import SourcePool
    from fusion.sources.vocab_map import default_cache_dir

    parser = ArgumentParser(prog="python -m fusion.bench lookahead", description=__doc__)
    parser.add_argument("--config", required=True, help="a quality bench YAML, e.g. configs/bench_unlabeled.yaml")
    parser.add_argument("--pool", default="A")
    parser.add_argument("--rows", type=int | None, default=None, help="the first this many labelled rows (default: all)")
    parser.add_argument("--per_row", type=int, default=4, help="changed positions per row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="checkpoints/bench/lookahead")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    with open(args.config) as f:
        bench = yaml.safe_load(f)
    torch.set_num_threads(2)
    model = bench["train"]["model"]
    tokenizer = load_tokenizer(model["student"])
    pool = SourcePool.load(
        bench["pools"][args.pool],
        tokenizer,
        top_k=model.get("source_top_k", 10),
        unaligned="marginal",
        vocab_map=model.get("vocab_map", "exact+med"),
        vocab_map_dir=default_cache_dir(),
    )
    data = FusionDataModule(tokenizer=model["student"], **{**bench["train"]["data"], "unlabeled_size": 0})
    data.load()
    batches, seen = [], 0
    for batch in data.labelled_loader():
        take = len(batch["input_ids"]) if args.rows is None else min(len(batch["input_ids"]), args.rows - seen)
        batches.append({k: batch[k][:take] for k in ("input_ids", "attention_mask", "targets")})
        seen += take
        if args.rows is not None and seen >= args.rows:
            break
    measured = measure(pool, batches, args.per_row, tokenizer, seed=args.seed)
    results = {name: {b: summary(found) for b, found in by.items()} for name, by in measured.items()}
    print(
        f"pool {args.pool}, {seen} labelled rows, {args.per_row} changed positions per row, unaligned: marginal; "
        "TV between the targets at the same text before the predicted token:\n"
    )
    print(
        "| source | boundary | positions | mean TV | TV > 0.05 | TV > 0.3 | source splits the text before differently | mean TV there | mean TV elsewhere |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, by in results.items():
        for boundary, r in by.items():
            if r["positions"]:
                there, elsewhere = (f"{v:.3f}" if v is not None else "-" for v in (r["mean_tv_split_differs"], r["mean_tv_same_split"]))
                print(
                    f"| {name} | {boundary} | {r['positions']} | {r['mean_tv']:.3f} | {r['share_above_0.05']:.2f} | {r['share_above_0.3']:.2f} "
                    f"| {r['share_split_differs']:.2f} | {there} | {elsewhere} |"
                )
    atomic_write_json(
        os.path.join(args.output, "report.json"),
        {"config": args.config, "pool": args.pool, "rows": seen, "per_row": args.per_row, "seed": args.seed, "results": results},
    )
    return results


if __name__ == "__main__":
    main()
