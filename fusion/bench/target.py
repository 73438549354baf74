"""How far the cached fused target is from the exact one.

    python -m fusion.bench target --config configs/bench.yaml [--pool A]

The offline cache keeps each source's own top-K. With k >= 2 sources fused, a source's mass on
an id that is in another selected source's top-K but not in its own then falls into the tail:
the cached target is smoother than the sources' mixture. Online, every selected source reports
its log-probability on the union of the selected sources' top-K, and the target is the true
mixture there. For every pair of sources of the pool, on the bench's labelled rows, with equal
weights, this prints per trained position (mean, 95th percentile, max):

- misplaced mass: the mixture's mass on the union that the cached target puts in its tail;
- KL(exact || cached), both on the partition {union ids} + tail: what training towards the
  cached target instead of the exact one costs in nats.

Writes `report.json` under `--output`.
"""

from __future__ import annotations

import itertools
import sys

import torch

from fusion.utils.io import atomic_write_json, atomic_write_text


def _quantiles(values: torch.Tensor) -> dict[str, float]:
    return {"mean": float(values.mean()), "p95": float(values.quantile(0.95)), "max": float(values.max())}


def measure(bench: dict, pool: str, rows: int | None = None) -> dict:
    from types import SimpleNamespace

    from fusion.data import IGNORE_INDEX
    from fusion.data.datamodule import FusionDataModule
    from fusion.objectives.fusion_rule import fused_target
    from fusion.stages.fusion import FusionDistillModule

    model = bench["train"]["model"]
    module = FusionDistillModule(
        student=model["student"],
        sources=bench["pools"][pool],
        fusion="uniform",
        **{k: model[k] for k in ("source_top_k", "temperature", "unaligned", "vocab_map") if k in model},
    )
    data = FusionDataModule(tokenizer=model["student"], **{**bench["train"]["data"], "unlabeled_size": 0})
    data.load()
    module.trainer = SimpleNamespace(datamodule=data)
    batches = list(data.labelled_loader())
    results = {}
    for pair in itertools.combinations(range(len(module.settings.sources)), 2):
        misplaced, kl = [], []
        seen = 0
        for batch in batches:
            if rows is not None and seen >= rows:
                break
            seen += len(batch["rows"])
            selected = torch.tensor(pair).expand(len(batch["rows"]), 2)
            alpha = torch.full((len(batch["rows"]), 2), 0.5)
            own = module.pool.run(selected, batch, module.hparams.temperature)
            exact = module.pool.run(selected, batch, module.hparams.temperature, union=True)
            both = own.aligned.all(1) & (batch["targets"] != IGNORE_INDEX)  # positions where both sources speak
            cached = fused_target(own.ids, own.logprobs, alpha, own.aligned)
            true = fused_target(exact.ids, exact.logprobs, alpha, exact.aligned)
            mass_cached, mass_true = cached.probs.sum(-1), true.probs.sum(-1)  # [B, T]
            misplaced.append((mass_true - mass_cached)[both])
            # KL on {union ids} + tail: the cached target's mass on each union id.
            present = true.ids >= 0
            on_cached = torch.zeros(true.ids.shape)
            for j in range(cached.ids.shape[-1]):
                match = (true.ids == cached.ids[..., j : j + 1]) & present
                on_cached = on_cached + match * cached.probs[..., j : j + 1]
            p, q = torch.where(present, true.probs, 0.0), on_cached
            tail_p, tail_q = (1 - p.sum(-1)).clamp(min=0), (1 - q.sum(-1)).clamp(min=1e-12)
            value = (torch.xlogy(p, p) - torch.xlogy(p, q.clamp(min=1e-12))).sum(-1) + torch.xlogy(tail_p, tail_p) - tail_p * tail_q.log()
            kl.append(value[both])
        name = " + ".join(module.settings.source_names[i] for i in pair)
        results[name] = {
            "positions": int(sum(len(m) for m in misplaced)),
            "misplaced_mass": _quantiles(torch.cat(misplaced)),
            "kl_exact_to_cached": _quantiles(torch.cat(kl)),
        }
    return results


def main(argv: list[str] | None = None) -> dict:
    import os

    import yaml
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="python -m fusion.bench target", description=__doc__)
    parser.add_argument("--config", required=True, help="a quality bench YAML, e.g. configs/bench.yaml")
    parser.add_argument("--pool", default="A")
    parser.add_argument("--rows", type=int | None, default=None, help="labelled rows per pair (default: all)")
    parser.add_argument("--output", default="checkpoints/bench/target")
    arguments = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(arguments)
    with open(args.config) as f:
        bench = yaml.safe_load(f)
    torch.set_num_threads(2)
    from fusion.bench._quality_report import provenance, provenance_line

    origin = provenance(arguments, "python -m fusion.bench target")
    results = measure(bench, args.pool, args.rows)
    lines = [
        "# What a cached target loses",
        "",
        provenance_line(origin),
        "",
        f"pool {args.pool}, K = {bench['train']['model'].get('source_top_k', 10)}, pairs of sources with equal weights, "
        "per trained position where both speak:",
        "",
        "| sources | positions | misplaced mass: mean | p95 | max | KL(exact ‖ cached), nats: mean | p95 | max |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        m, k = r["misplaced_mass"], r["kl_exact_to_cached"]
        lines.append(
            f"| {name} | {r['positions']} | {m['mean']:.4f} | {m['p95']:.4f} | {m['max']:.4f} | {k['mean']:.4f} | {k['p95']:.4f} | {k['max']:.4f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    report = {"provenance": origin, "config": args.config, "pool": args.pool, "results": results}
    atomic_write_json(os.path.join(args.output, "report.json"), report)
    atomic_write_text(os.path.join(args.output, "report.md"), text)
    return results


if __name__ == "__main__":
    main()
