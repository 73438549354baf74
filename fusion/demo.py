"""The quickstart: build the zoo models a config uses, fuse them into the student with each
method, print a table.

    python -m fusion.demo --zoo configs/zoo.yaml --config configs/quickstart.yaml
    python -m fusion.demo --zoo '' --seeds 0 1 2     # every method per seed: mean ± std

The quick start is label-scarce: 50 gold answers and 500 prompts without one per domain. Every
method is the same `predict` (the sources answer the unlabeled prompts once and score the
answers, into the offline cache) + `fit` + `test` of `fusion.train` with another `model.fusion`;
`--online` runs the sources during `fit` instead. Results land in
`checkpoints/quickstart/<method>/version_N/metrics.json` (checkpoints in
`checkpoints/quickstart/<method>/checkpoints/`, caches in `checkpoints/cache/quickstart/<method>/`;
with `--seeds`, `<method>-seed<N>`) and, side by side, in `results.json` and `results.md` under
`--output`. A method's checkpoints resume an interrupted run of the same config, arguments and
models, and are removed otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint

from fusion import zoo
from fusion.objectives.methods import METHODS, generations_per_prompt
from fusion.sources.cache import is_current, model_fingerprint
from fusion.sources.pool import source_name
from fusion.stages.evaluation import best_sources, ratio_to_sources, source_accuracy
from fusion.train import main as cli
from fusion.utils.callbacks import best_checkpoint
from fusion.utils.io import atomic_write_json, atomic_write_text

BEFORE = "before training"


def _forget_other_runs(directory: str, run: dict) -> None:
    """A method's checkpoints resume its own run after a crash; those of a run with another
    config, other arguments or other models (a rebuilt zoo) are removed, so that nothing resumes
    from them."""
    stamp = os.path.join(directory, "demo-run.json")
    if os.path.isdir(directory):
        found = None
        if os.path.isfile(stamp):
            with open(stamp) as f:
                found = json.load(f)
        if found != run:
            shutil.rmtree(directory)
    atomic_write_json(stamp, run)


def run_method(config: str, method: str, extra: list[str], online: bool = False, seed: int | None = None) -> dict:
    fusion = "none" if method == BEFORE else method  # the untrained adapter is the identity: the base student
    name = method.replace(" ", "_") + ("" if seed is None else f"-seed{seed}")
    args = ["--config", config, "--model.fusion", fusion, "--trainer.logger.init_args.name", name]
    if seed is not None:
        args.append(f"--seed_everything={seed}")
    if METHODS[fusion].uses_sources and not online:
        args += ["--model.source_mode=cached", f"--model.cache_dir=checkpoints/cache/quickstart/{method}"]
    run = cli(args=args + extra, run=False)
    if run.trainer.logger is not None:  # each method its own last.ckpt and on_exception.ckpt
        directory = os.path.realpath(os.path.join(run.trainer.logger.root_dir, "checkpoints"))
        for callback in run.trainer.callbacks:
            if isinstance(callback, ModelCheckpoint | OnExceptionCheckpoint):
                callback.dirpath = directory
        with open(config) as f:
            config_text = f.read()
        models = [run.model.hparams.student, *run.model.hparams.sources]
        _forget_other_runs(
            directory, {"config": config_text, "arguments": args + extra, "models": {path: model_fingerprint(path) for path in models}}
        )
    timings = {}
    started = time.time()
    if run.model.hparams.source_mode == "cached":
        run.datamodule.setup("predict")
        if not is_current(run.model.hparams.cache_dir, run.model.cache_fingerprint(run.datamodule)):
            run.trainer.predict(run.model, datamodule=run.datamodule, return_predictions=False)
        timings["cache_seconds"] = time.time() - started
    best = None
    if method != BEFORE:
        run.trainer.fit(run.model, datamodule=run.datamodule)
        best = best_checkpoint(run.trainer)  # the weights that did best on the validation split
    run.trainer.test(run.model, datamodule=run.datamodule, verbose=False, ckpt_path=best, weights_only=True)
    sources = len(run.model.settings.sources)
    return run.model.test_results | timings | {"generations_per_prompt": generations_per_prompt(METHODS[fusion], sources)}


def source_ceiling(config: str, extra: list[str]) -> dict[str, dict[str, float]]:
    """Each source of the config answering the test prompts itself (greedy, its own tokens):
    source name -> accuracy per domain."""
    run = cli(args=["--config", config, "--model.fusion=none", *extra], run=False)
    h, data = run.model.hparams, run.datamodule
    rows = data.load()["test"]
    return {
        source_name(path): source_accuracy(
            path, rows, h.max_new_tokens, f"model.sources[{i}]", h.dtype, h.trust_remote_code, data.hparams.max_length
        )
        for i, path in enumerate(h.sources)
    }


def table(results: dict[str, list[dict]], sources: dict[str, dict[str, float]] | None = None) -> str:
    """One row per method: accuracy per domain with its ratio to the best source there (in
    brackets), mean accuracy, mean and worst ratio; mean ± std when there are several seeds.
    First a row of the best source per domain (its own greedy answers)."""
    domains = sorted({d for runs in results.values() for r in runs for d in r["acc"]})
    best = {d: value for d, (_, value) in best_sources(sources or {}).items()}

    def cell(values: list[float | None], digits: int) -> str:
        values = [v for v in values if v is not None]
        if not values:
            return "n/a"
        if len(values) == 1:
            return f"{values[0]:.{digits}f}"
        return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"

    header = "| method | generations / unlabeled prompt | " + " | ".join(domains) + " | mean | mean ratio | worst ratio | seconds |"
    lines = [header, "|" + "---|" * (len(domains) + 6)]
    if best:
        names = best_sources(sources)
        cells = " | ".join(f"{best[d]:.2f} ({names[d][0]})" if d in best else "-" for d in domains)
        lines.append(
            f"| best source (its own answers) | | {cells} | {sum(best.get(d, 0.0) for d in domains) / len(domains):.3f} | 1 | 1 | |"
        )
    for method, runs in results.items():
        ratios = [ratio_to_sources(r["acc"], best) for r in runs] if best else []
        cells = []
        for d in domains:
            accuracy = cell([r["acc"].get(d, 0.0) for r in runs], 2)
            ratio = f" ({cell([x['ratio'][d] for x in ratios], 2)})" if ratios else ""
            cells.append(accuracy + ratio)
        mean = cell([r["acc_mean"] for r in runs], 3)
        ratio_mean = cell([x["ratio_mean"] for x in ratios], 2) if ratios else "-"
        ratio_min = cell([x["ratio_min"] for x in ratios], 2) if ratios else "-"
        seconds = statistics.mean(r["seconds"] for r in runs)
        lines.append(
            f"| {method} | {runs[0]['generations_per_prompt']} | {' | '.join(cells)} | {mean} | {ratio_mean} | {ratio_min} | {seconds:.0f} |"
        )
    return "\n".join(lines)


def zoo_names(config: str, zoo_config: str) -> list[str]:
    """The zoo models a fusion config names: its student and sources under the zoo's output_dir."""
    import yaml

    with open(config) as f:
        model = yaml.safe_load(f)["model"]
    with open(zoo_config) as f:
        output_dir = os.path.normpath(yaml.safe_load(f)["output_dir"])
    paths = [model["student"], *model.get("sources", [])]
    return [os.path.basename(os.path.normpath(p)) for p in paths if os.path.dirname(os.path.normpath(p)) == output_dir]


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", default="configs/zoo.yaml", help="zoo config, built or reused first ('' to skip)")
    parser.add_argument("--config", default="configs/quickstart.yaml", help="fusion config for fusion.train")
    parser.add_argument("--methods", nargs="+", default=[BEFORE, "none", "confidence", "selector", "oracle"])
    parser.add_argument("--online", action="store_true", help="run the sources during fit instead of caching them first")
    parser.add_argument("--output", default="checkpoints/quickstart", help="where results.json and results.md go")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="run every method once per seed_everything and print mean ± std (default: the config's seed, once)",
    )
    # Anything else goes to fusion.train for every method, e.g. --trainer.max_steps=100.
    args, overrides = parser.parse_known_args(argv)
    sys.argv = sys.argv[:1]  # each method's arguments are handed to the CLI explicitly
    started = time.time()
    if args.zoo:  # only the models the fusion config uses
        zoo.main(["--config", args.zoo, "--only", json.dumps(zoo_names(args.config, args.zoo))])
        print(f"zoo ready after {time.time() - started:.0f} s", flush=True)
    sources = source_ceiling(args.config, overrides)
    print("sources, their own greedy answers: " + "; ".join(f"{n} {acc}" for n, acc in sources.items()), flush=True)
    results: dict[str, list[dict]] = {method: [] for method in args.methods}
    for seed in args.seeds or [None]:
        for method in args.methods:
            method_started = time.time()
            result = run_method(args.config, method, overrides, args.online, seed)
            result["seconds"] = time.time() - method_started
            results[method].append(result | {"seed": seed})
            print(
                f"{method}{'' if seed is None else f' (seed {seed})'}: mean accuracy {result['acc_mean']:.3f} ({result['seconds']:.0f} s)",
                flush=True,
            )
    report = table(results, sources)
    atomic_write_text(os.path.join(args.output, "results.md"), report + "\n")
    atomic_write_json(os.path.join(args.output, "results.json"), {"sources": sources, "methods": results})
    seeds = "" if not args.seeds else f", mean ± std over seeds {', '.join(map(str, args.seeds))}"
    print(
        f"\nTest accuracy (exact match) per domain, student after each method{seeds}; in brackets, the ratio to the best "
        f"source of the pool there:\n" + report
    )
    selector = results.get("selector", [{}])[0]
    if "selection_by_domain" in selector:
        print("\nSelector: share of each domain's test prompts it routes to each source")
        for domain, shares in selector["selection_by_domain"].items():
            print(f"  {domain:<24} " + "  ".join(f"{name}={share:.2f}" for name, share in shares.items() if share > 0.005))
    print(f"\ntotal {time.time() - started:.0f} s")
    return results


if __name__ == "__main__":
    main()
