"""Does the feedback (balancing) loss bias the quality the selector predicts?

    python -m fusion.bench selector --config configs/bench_unlabeled.yaml

For each pool of the bench config, every source runs once on the labelled rows (every source's
CE observed), and the selector is fitted to them as `fit` does before it routes the first
unlabeled prompt (`fusion.objectives.selection.fit_selector`), with each selector loss of `--selector_losses` (`mse`: u onto -CE; `likelihood`:
exp(u) onto the probability of each response, `fusion.objectives.losses.selector_loss`), the
feedback loss at each weight of `--feedback_weights` and one selector initialization per seed.
Reported per pool, loss and weight, mean ± std over seeds:

- routed to the specialist: the share of the corpus's unlabeled prompts whose top-1 source is
  their domain's specialist (`train.model.oracle`), and the share sent to a source outside
  pool A (a distractor); and the share routed to the specialist per domain;
- bias: the selector's mean signed error u_i + CE_i on the labelled rows, averaged over the
  specialists and over the distractors (> 0: overrated).

Writes `report.json` and `report.md` under `--output`.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from fusion.bench._quality_report import provenance, provenance_line
from fusion.utils.io import atomic_write_json, atomic_write_text


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def measure_pool(bench: dict, pool: str, feedback_weights: list[float], seeds: list[int], selector_losses: list[str] = ("mse",)) -> dict:
    from types import SimpleNamespace

    from fusion.data import IGNORE_INDEX
    from fusion.data.datamodule import FusionDataModule
    from fusion.objectives.selection import SourceSelector, fit_selector
    from fusion.sources.pool import source_name
    from fusion.stages.fusion import FusionDistillModule

    model = bench["train"]["model"]
    sources = bench["pools"][pool]
    names = [source_name(p) for p in sources]
    specialists = {source_name(p) for p in bench["pools"]["A"]}
    module = FusionDistillModule(
        student=model["student"],
        sources=sources,
        fusion="selector",
        top_k=1,
        **{k: model[k] for k in ("selector_hidden", "selector_learning_rate", "selector_prefit_steps") if k in model},
    )
    data = FusionDataModule(tokenizer=model["student"], **bench["train"]["data"])
    data.load()
    module.trainer = SimpleNamespace(datamodule=data)  # what the labelled observations read
    features, ce, observed = module.labelled_observations()  # per-token CE (the module's selector_loss is mse)
    tokens = torch.cat([(batch["targets"] != IGNORE_INDEX).sum(-1) for batch in data.labelled_loader()]).float()
    observations = {"likelihood": ce * tokens[:, None]}  # the sequence NLL, as the module passes it with that loss
    prompts = []
    with torch.no_grad():
        for batch in torch.utils.data.DataLoader(data._features("unlabeled"), batch_size=256, collate_fn=data._collate):
            prompts.append(module.router.features(batch))
    prompts = torch.cat(prompts)
    domains = [row["domain"] for row in data.load()["unlabeled"]]
    specialist_of = torch.tensor([names.index(model["oracle"][d]) for d in domains])
    domain_rows = {d: torch.tensor([x == d for x in domains]) for d in sorted(set(domains))}
    is_distractor = torch.tensor([name not in specialists for name in names])
    h = module.hparams
    results = {}
    for loss, weight in [(loss, weight) for loss in selector_losses for weight in feedback_weights]:
        runs = []
        observation = observations.get(loss, ce)
        for seed in seeds:
            torch.manual_seed(seed)  # a fresh selector, as a run with this seed starts with
            module.selector = SourceSelector(module.selector.net[1].in_features, len(names), h.selector_hidden, h.initial_quality)
            fit = fit_selector(
                module.selector,
                features,
                observation,
                observed,
                h.selector_prefit_steps,
                h.selector_learning_rate,
                loss,
                feedback_weight=weight,
                tau=h.tau,
            )
            with torch.no_grad():
                error = torch.where(observed, module.selector(features) + observation, 0.0).sum(0) / observed.sum(0).clamp(min=1)  # [N]
                picked = module.selector(prompts).argmax(-1)
            runs.append(
                {
                    "routed_to_specialist": float((picked == specialist_of).float().mean()),
                    "routed_to_specialist_by_domain": {
                        d: float((picked == specialist_of)[domain_rows[d]].float().mean()) for d in domain_rows
                    },
                    "routed_to_distractor": float(is_distractor[picked].float().mean()),
                    "bias_specialists": float(error[~is_distractor].mean()),
                    "bias_distractors": float(error[is_distractor].mean()) if is_distractor.any() else None,
                    "bias": dict(zip(names, error.tolist())),
                    "steps": fit["steps"],
                }
            )
        summary = {"runs": runs}
        for key in ("routed_to_specialist", "routed_to_distractor", "bias_specialists", "bias_distractors"):
            values = [r[key] for r in runs if r[key] is not None]
            if values:
                summary[key] = statistics.fmean(values)
                summary[f"{key}_std"] = _std(values)
        summary["routed_to_specialist_by_domain"] = {
            d: statistics.fmean(r["routed_to_specialist_by_domain"][d] for r in runs) for d in domain_rows
        }
        results[f"{loss} {weight}" if len(selector_losses) > 1 else str(weight)] = summary
    return {"sources": names, "labelled_rows": len(features), "unlabeled_prompts": len(prompts), "feedback_weights": results}


def markdown(report: dict) -> str:
    lines = [
        "# Does balancing bias the selector?",
        "",
        *([provenance_line(p), ""] if (p := report.get("provenance")) else []),
        "The selector fitted on the labelled rows (every source observed) with the feedback loss at each weight; "
        f"mean ± std over selector initializations {report['seeds']}. Routed: the share of unlabeled prompts whose "
        "top-1 source is their domain's specialist, or a distractor. Bias: mean u_i + CE_i on the labelled rows "
        "(nats; > 0 overrates the source).",
        "",
        "| pool | selector loss, feedback weight | routed to the specialist | routed to a distractor | bias, specialists | bias, distractors | routed to the specialist, per domain |",
        "|---|---|---|---|---|---|---|",
    ]
    for pool, entry in report["pools"].items():
        for weight, r in entry["feedback_weights"].items():
            distractors = f"{r['bias_distractors']:+.3f} ± {r['bias_distractors_std']:.3f}" if "bias_distractors" in r else "-"
            by_domain = ", ".join(f"{d} {v:.2f}" for d, v in r.get("routed_to_specialist_by_domain", {}).items())
            lines.append(
                f"| {pool} | {weight} | {r['routed_to_specialist']:.4f} ± {r['routed_to_specialist_std']:.4f} | "
                f"{r['routed_to_distractor']:.4f} ± {r['routed_to_distractor_std']:.4f} | "
                f"{r['bias_specialists']:+.3f} ± {r['bias_specialists_std']:.3f} | {distractors} | {by_domain} |"
            )
    lines += ["", f"Runtime: {report['runtime_seconds']:.0f} s.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    import os

    import yaml
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="python -m fusion.bench selector", description=__doc__)
    parser.add_argument("--config", required=True, help="a quality bench YAML with unlabeled prompts, e.g. configs/bench_unlabeled.yaml")
    parser.add_argument("--feedback_weights", type=list[float], default=[0.0, 0.1, 1.0])
    parser.add_argument("--seeds", type=list[int], default=[0, 1, 2])
    parser.add_argument(
        "--selector_losses",
        type=list[str],
        default=["mse", "likelihood"],
        help="model.selector_loss values to compare (likelihood: onto each response's probability)",
    )
    parser.add_argument("--output", default="checkpoints/bench/selector")
    arguments = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(arguments)
    with open(args.config) as f:
        bench = yaml.safe_load(f)
    torch.set_num_threads(2)
    started = time.time()
    report = {
        "provenance": provenance(arguments, "python -m fusion.bench selector"),
        "config": args.config,
        "seeds": args.seeds,
        "pools": {},
    }
    for pool in bench["pools"]:
        report["pools"][pool] = measure_pool(bench, pool, args.feedback_weights, args.seeds, args.selector_losses)
    report["runtime_seconds"] = time.time() - started
    atomic_write_json(os.path.join(args.output, "report.json"), report)
    text = markdown(report)
    atomic_write_text(os.path.join(args.output, "report.md"), text)
    print(text)
    return report


if __name__ == "__main__":
    main()
