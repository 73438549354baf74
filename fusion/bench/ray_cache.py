"""Prompts per second of the offline cache built by `predict` and on Ray with 1 and 2 workers, in one run.

    python -m fusion.bench ray_cache [--workers 1 2] [--rounds R] [--cpus_per_actor C] [--output DIR] \\
        --config configs/quickstart.yaml --config configs/cache.yaml [fusion.train predict overrides]

Every argument the bench does not know is read as `python -m fusion.train predict` reads it. The
same cache is built three ways, one after the other, each into its own directory:
`fusion.train predict` in this process (torch's default threads), then `fusion.cache_ray` on
one local Ray (started once, its start timed apart) with W actors per source for each W of
`--workers`; with `--rounds R` the three take turns R times and each build's best round is
reported (a slow moment of a shared machine then hits them alike). A build's time is its whole command: parsing, data, starting the actors and loading
their models, every batch, every shard written; predict's includes loading its models. Each Ray
build must equal predict's byte for byte: the same fingerprint.json and, shard by shard, the
same manifest (every file's size and sha256). "prompts" are the corpus's rows: the labelled rows
and the prompts without gold. Each actor gets `--cpus_per_actor` of Ray's CPUs (default: the
machine's CPUs shared evenly by the most actors that run at once, the student's and two pools
per source) and one torch thread. Writes report.md and report.json under `--output`; the caches
are removed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time

from lightning.pytorch.callbacks import Callback

from fusion.utils.io import atomic_write_json

PROG = "python -m fusion.bench ray_cache"


class PredictClock(Callback):
    """predict's work alone: from its start (models loaded; the selector's prefit and every batch
    still to come) to its end."""

    times: dict[str, float] = {}

    def on_predict_start(self, trainer, pl_module) -> None:
        PredictClock.times["start"] = time.perf_counter()

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        PredictClock.times.setdefault("batches", time.perf_counter())

    def on_predict_end(self, trainer, pl_module) -> None:
        PredictClock.times["end"] = time.perf_counter()


def same_cache(ours: str, theirs: str) -> bool:
    """Whether two cache directories hold the same fingerprint and the same shard files (sizes and sha256)."""
    import glob

    def read(directory: str) -> dict:
        files = {"fingerprint": os.path.join(directory, "fingerprint.json")}
        files |= {os.path.basename(s): os.path.join(s, "manifest.json") for s in sorted(glob.glob(os.path.join(directory, "shard-*")))}
        out = {}
        for name, path in files.items():
            with open(path) as f:
                out[name] = json.load(f)
        return out

    return read(ours) == read(theirs)


def _predict(predict_args: list[str], directory: str, train) -> dict:
    """`fusion.train predict` into `directory`, timed: the whole command and its parts (`PredictClock`)."""
    started = time.perf_counter()
    clock = f"--trainer.callbacks+={PredictClock.__module__}.{PredictClock.__name__}"
    PredictClock.times = {}
    with contextlib.redirect_stdout(sys.stderr):  # the builds' own output stays out of the report
        train(["predict", *predict_args, f"--model.cache_dir={directory}", clock])
    seconds, times = time.perf_counter() - started, PredictClock.times
    phases = {"prepare": times["start"] - started, "actors starting": 0.0, "batches": times["end"] - times["batches"]}
    phases["prefit"] = times["batches"] - times["start"]
    return {"build": "fusion.train predict", "workers": None, "seconds": seconds, "equal": True, "busy": {}, "phases": phases}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="actors per source of each Ray build (default 1 2)")
    parser.add_argument("--cpus_per_actor", type=float, default=None, help="Ray CPUs per actor (default: shared evenly, see above)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of all builds, taking turns; each build's best round is reported")
    parser.add_argument("--output", default="checkpoints/bench/ray_cache", help="directory of report.md and report.json")
    arguments = sys.argv[1:] if argv is None else list(argv)
    args, predict_args = parser.parse_known_args(arguments)
    if not predict_args:
        parser.error("pass the arguments `python -m fusion.train predict` runs with (at least --config)")

    from fusion.bench._quality_report import printed_report
    from fusion.cache_ray import RaySettings, build_cache, parse_predict_command, restore_signal_handlers, saved_signal_handlers
    from fusion.train import main as train
    from fusion.utils.optional import ray_data

    ray = ray_data()
    command = parse_predict_command(predict_args)
    n = len(command.model["sources"])
    cpus = os.cpu_count() or 1
    with printed_report(PROG, arguments, "The offline cache on Ray against predict") as report:
        report["output"] = args.output
        root = os.path.join(args.output, "caches")
        started = time.perf_counter()
        ours = not ray.is_initialized()  # a Ray started by the caller (a test) is used as it is
        handlers = saved_signal_handlers()
        if ours:
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - started
        cpus = int(ray.cluster_resources().get("CPU", cpus))
        runs: list[list[dict]] = []  # per round: predict, then each Ray build
        try:
            for _ in range(args.rounds):  # the builds take turns: a slow moment of the machine hits them alike
                shutil.rmtree(root, ignore_errors=True)
                runs.append([_predict(predict_args, os.path.join(root, "predict"), train)])
                for workers in args.workers:
                    share = args.cpus_per_actor or cpus / ((2 * n + 1) * workers)
                    directory = os.path.join(root, f"ray{workers}")
                    with contextlib.redirect_stdout(sys.stderr):  # the builds' own output stays out of the report
                        result = build_cache(
                            [*predict_args, f"--model.cache_dir={directory}"], RaySettings(actors_per_source=workers, cpus_per_actor=share)
                        )
                    runs[-1].append(
                        {
                            "build": "fusion.cache_ray",
                            "workers": workers,
                            "seconds": result.seconds,
                            "equal": same_cache(directory, os.path.join(root, "predict")),
                            "cpus_per_actor": share,
                            "busy": result.busy,
                            "phases": result.phases,
                        }
                    )
                    rows = result.rows
        finally:
            if ours:
                ray.shutdown()
                restore_signal_handlers(handlers)
            shutil.rmtree(root, ignore_errors=True)
        builds = [min(column, key=lambda run: run["seconds"]) for column in zip(*runs)]  # each build's best round
        for build, column in zip(builds, zip(*runs)):
            build["rounds"] = [run["seconds"] for run in column]
            build["equal"] = all(run["equal"] for run in column)
        predict_seconds = builds[0]["seconds"]
        print(
            f"\n{rows} prompts ({n} sources, model.fusion {command.model['fusion']}), {cpus} CPUs; the local Ray started in "
            f"{ray_start:.1f} s (not counted below); each build's best of {args.rounds} round(s), the builds taking turns"
        )
        print("| build | actors per source | seconds | prompts/s | speed against predict | same bytes as predict |")
        print("|---|---|---|---|---|---|")
        for build in builds:
            workers = "-" if build["workers"] is None else f"{build['workers']} ({build['cpus_per_actor']:.3g} CPU each)"
            speed = predict_seconds / build["seconds"]
            print(
                f"| {build['build']} | {workers} | {build['seconds']:.1f} | {rows / build['seconds']:.2f} | {speed:.2f} | {'yes' if build['equal'] else 'NO'} |"
            )
        print("\nWhere the seconds went (predict loads its models in prepare; Ray's actors load theirs while starting):")
        print("| build | prepare | actors starting | selector prefit | batches | batches: prompts/s |")
        print("|---|---|---|---|---|---|")
        for build in builds:
            phases, name = build["phases"], build["build"] + (f", {build['workers']} per source" if build["workers"] else "")
            cells = " | ".join(f"{phases[key]:.1f}" for key in ("prepare", "actors starting", "prefit", "batches"))
            print(f"| {name} | {cells} | {rows / phases['batches']:.2f} |")
        pools = sorted({name for build in builds[1:] for name in build["busy"]})
        print("\nSeconds of work per pool, its actors together (each on its share of the CPUs):")
        print("| pool | " + " | ".join(f"{b['workers']} per source" for b in builds[1:]) + " |")
        print("|---|" + "---|" * len(builds[1:]))
        for pool in pools:
            print(f"| {pool} | " + " | ".join(f"{b['busy'].get(pool, 0.0):.1f}" for b in builds[1:]) + " |")
        busiest = max(builds[1]["busy"], key=builds[1]["busy"].get) if len(builds) > 1 else None
        if busiest is not None:
            seconds = builds[1]["busy"][busiest]
            print(
                f"\nbusiest Ray pool ({builds[1]['workers']} per source): {busiest}, {seconds:.1f} s for {rows} prompts: "
                f"{rows / seconds:.2f} prompts/s per actor of that pool"
            )
        atomic_write_json(
            os.path.join(args.output, "report.json"),
            {
                "provenance": report["provenance"],
                "prompts": rows,
                "sources": n,
                "cpus": cpus,
                "ray_start_seconds": ray_start,
                "builds": builds,
            },
        )
    if not all(build["equal"] for build in builds):
        raise SystemExit("a Ray build differs from predict's cache")


if __name__ == "__main__":
    main()
