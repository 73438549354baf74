"""Quality and knowledge interference of every fusion method, over seeds, with plots.

    python -m fusion.bench quality --config configs/bench.yaml [--quick]

For each seed and each pool of sources (A = the specialists; B = A plus distractors) it trains a
student with each method of `methods` (a name -> `model.*` settings of `fusion.train`), all from
the same `train` config, data and steps, and tests it. Then the weight-merging baseline: LoRA
specialists of the student's base (built once, like the zoo) merged with peft
(`fusion/merging.py`) and tested through the same `fusion.train` test path.

- `source_mode: cached`: each pool's sources run once (`predict`, the offline cache) and every
  method trains from the cache; `consistency` names one run that is trained online as well, to
  measure that both give the same quality.
- `none` runs no source and `oracle` runs only each domain's specialist (in both pools): they do
  not depend on the pool, so they are trained once per seed and reported for both pools.
- A run whose config is unchanged is reused from `output/runs/*/result.json` (a stopped bench
  resumes; a seed can be added later).
- On-policy methods (`response_from: student`, or `selector_signal: rewards`) run their sources
  online whatever `source_mode` says: what they score is written during training.
- A method with `after: <method>` and `srft: {steps, model}` is SRFT (`fusion.stages.srft`) started from
  that method's adapter (its fusion run saves it), tested like every run; its wall time is both
  stages'. With `fusion_stage: {steps, model}` instead, the second stage is fusion again
  (`model.init_from` that adapter, and its selector), with `model` merged over the `after`
  method's settings: e.g. on-policy fusion after off-policy fusion. SRFT's rollouts are scored by its rewards on the labelled rows only (the SRFT stage's
  data are the train split's labelled rows).
- `--quick` applies the `quick_settings` section (fewer seeds and steps, a smaller test split): the same
  code, in a few minutes.

Writes `report.json`, `report.md` and PNG plots under `output` (see `_quality_report.py`).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context

import yaml

from fusion.bench import _quality_report as report_lib
from fusion.utils.io import atomic_write_json

BASE = "student base (no training)"  # the floor every method must reach
# A chained method's second stage, started from the adapter of its `after` method: the settings it takes.
CHAINED_STAGES = {"srft": "SRFTModule", "fusion_stage": "model.* of fusion.train, over the after method's"}


def deep_merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        merged[key] = (
            deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else copy.deepcopy(value)
        )
    return merged


@dataclass
class Merging:
    """The weight-merging baseline.

    zoo: `fusion.zoo.build_zoo` arguments for the LoRA sources (recipes with `base`); no student.
    pools: pool name -> names of the zoo's adapters merged for that pool.
    methods: name -> `merge_adapters` arguments (combination_type, weights, density, svd_rank: the
        LoRA-native merge by peft), or {mergekit: <a `merging.MERGEKIT_METHODS` name>, ...} and
        `merge_models` arguments (weights, density, t, seed, parameters): the adapters folded
        into the base, then merged as full models by mergekit over that base.
    steps: when set, every recipe of `zoo` trains this many steps (for `quick`).
    """

    zoo: dict = field(default_factory=dict)
    pools: dict[str, list[str]] = field(default_factory=dict)
    methods: dict[str, dict] = field(default_factory=dict)
    steps: int | None = None

    def __post_init__(self):
        from fusion.merging import MERGEKIT_METHODS

        for name, options in self.methods.items():
            if "mergekit" in options and options["mergekit"] not in MERGEKIT_METHODS:
                raise ValueError(f"merging.methods.{name}.mergekit must be one of {MERGEKIT_METHODS}, got {options['mergekit']!r}")


@dataclass
class QualityBench:
    """The benchmark's settings (configs/bench.yaml).

    train: a complete `fusion.train` config shared by every run (trainer, model, data).
    pools: "A" (specialists) and "B" (A plus distractors): source paths.
    methods: name -> `model.*` settings of each method, e.g. {fusion: selector, top_k: 2}.
    seeds: `seed_everything` of each repetition (the data are the same for all).
    steps: training steps of every method.
    source_mode: "cached" (sources run once per pool, `predict`) or "online".
    consistency: {method, pool, seed} trained online as well, to compare with cached; or null.
    merging: the weight-merging baseline, or null.
    workers: runs at once, each in its own process.
    threads: torch threads of each run (more threads than free cores slow tiny models down many
        times over: they spin waiting for each other).
    output: where runs, caches, merged models and the report go.
    run_pools: the pools the methods train in (both by default; the sources of both are measured).
    teacher: domain -> names of sources of pool A that know it: each group decodes the domain's test
        prompts together (`fusion.sources.fused_decoding`, equal weights), the accuracy a student
        distilled from their mixture could reach, reported beside the sources; or null.
    quick_settings: what `--quick` merges over these (nested dicts merge key by key).
    """

    train: dict
    pools: dict[str, list[str]]
    methods: dict[str, dict]
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = 800
    source_mode: str = "cached"
    consistency: dict | None = None
    merging: dict | None = None
    workers: int = 2
    threads: int = 1
    output: str = "checkpoints/bench/quality"
    run_pools: list[str] = field(default_factory=lambda: ["A", "B"])
    teacher: dict[str, list[str]] | None = None
    quick_settings: dict = field(default_factory=dict)

    @property
    def unlabeled(self) -> bool:
        """Whether the fusion corpus holds prompts without gold answers (the label-scarce regime)."""
        data = self.train.get("data", {})
        return bool(data.get("unlabeled_size") or data.get("unlabeled_file") or data.get("missing_response") == "unlabeled")

    def __post_init__(self):
        if isinstance(self.merging, dict):
            self.merging = Merging(**self.merging)
        if set(self.pools) != {"A", "B"}:
            raise ValueError(f"pools must be exactly A (specialists) and B (A plus distractors), got {sorted(self.pools)}")
        if not set(self.pools["A"]) < set(self.pools["B"]):
            raise ValueError("pools.B must hold every source of pools.A and at least one distractor")
        if not self.run_pools or set(self.run_pools) - {"A", "B"} or len(set(self.run_pools)) != len(self.run_pools):
            raise ValueError(f"run_pools must list A, B or both, once each, got {self.run_pools}")
        names = [os.path.basename(os.path.normpath(p)) for p in self.pools["A"]]
        for domain, group in (self.teacher or {}).items():
            if not group or set(group) - set(names):
                raise ValueError(f"teacher.{domain} must name sources of pools.A {names}, got {group}")
        if self.source_mode not in ("cached", "online"):
            raise ValueError(f"source_mode must be 'cached' or 'online', got {self.source_mode!r}")
        for name, settings in self.methods.items():
            if "after" in settings:
                stages = [key for key in CHAINED_STAGES if key in settings]
                if (
                    settings["after"] not in self.methods
                    or "after" in self.methods[settings["after"]]
                    or len(stages) != 1
                    or len(settings) != 2
                ):
                    raise ValueError(
                        f"methods.{name}: a chained method is {{after: <a fusion method of methods>, srft or fusion_stage: "
                        f"{{steps, model}}}}, got {settings}"
                    )
                stage = settings[stages[0]]
                if set(stage) - {"steps", "model"} or stage.get("steps", 0) < 1:
                    raise ValueError(
                        f"methods.{name}.{stages[0]}: expected {{steps: >= 1, model: {CHAINED_STAGES[stages[0]]} settings}}, got {stage}"
                    )
            elif "fusion" not in settings:
                raise ValueError(f"methods.{name} needs a fusion setting (none, uniform, avgce, mince, single, oracle, selector)")
        if self.consistency and (self.consistency.get("method") not in self.methods or self.consistency.get("pool") not in self.pools):
            raise ValueError(f"consistency must name one of methods {list(self.methods)} and a pool A or B, got {self.consistency}")
        if not self.seeds or min(self.steps, self.workers, self.threads) < 1:
            raise ValueError("seeds must not be empty; steps, workers and threads must be at least 1")


# ------------------------------------------------------------------------------------ jobs


def _run_job(job: dict) -> dict:
    """One `fusion.train` run in a worker process: predict (the cache), fit + test, or test."""
    import torch

    from fusion.train import main as cli
    from fusion.utils.callbacks import best_checkpoint

    torch.set_num_threads(job["threads"])
    started = time.time()
    shutil.rmtree(job["log_dir"], ignore_errors=True)
    run = cli(args=job["config"], run=False)
    if job["kind"] == "predict":
        cache_dir = run.model.hparams.cache_dir
        timing = os.path.join(cache_dir, "bench_seconds.json")  # how long writing this cache took
        if _cache_is_current(run) and os.path.isfile(timing):
            with open(timing) as f:
                return {"seconds": json.load(f)["seconds"], "cache_dir": cache_dir}
        run.trainer.predict(run.model, datamodule=run.datamodule, return_predictions=False)
        result = {"seconds": time.time() - started, "cache_dir": cache_dir}
        atomic_write_json(timing, result)
        return result
    if job["kind"] == "source":  # a source's own greedy answers on the test split: the ceiling
        from fusion.stages.evaluation import source_accuracy

        h, data = run.model.hparams, run.datamodule
        accuracy = {
            split: source_accuracy(
                h.sources[0], data.load()[split], h.max_new_tokens, "pools", h.dtype, h.trust_remote_code, data.hparams.max_length
            )
            for split in ("test", "val")
        }
        result = {**job["record"], "acc": accuracy["test"], "val_acc": accuracy["val"], "seconds": time.time() - started}
        atomic_write_json(job["result_path"], {"config_hash": job["config_hash"], "result": result})
        return result
    if job["kind"] == "teacher":  # the named sources decoding one domain's test prompts together
        from fusion.bench.teacher import fused_teacher

        h, domain = run.model.hparams, job["record"]["teacher"]
        rows = [row for row in run.datamodule.load()["test"] if row["domain"] == domain]
        accuracy, record = fused_teacher(h.sources, h.student, rows, h.max_new_tokens, dtype=h.dtype, trust_remote_code=h.trust_remote_code)
        result = {**job["record"], "acc": accuracy, **record, "seconds": time.time() - started}
        atomic_write_json(job["result_path"], {"config_hash": job["config_hash"], "result": result})
        return result
    best = None
    if job["kind"] == "fit":
        run.trainer.fit(run.model, datamodule=run.datamodule)
        best = best_checkpoint(run.trainer)
    run.trainer.test(run.model, datamodule=run.datamodule, verbose=False, ckpt_path=best, weights_only=True)
    if job.get("adapter"):  # a chained stage starts from the weights tested
        run.trainer.save_checkpoint(job["adapter"], weights_only=True)
    result = {**job["record"], **run.model.test_results, "log_dir": job["log_dir"], "seconds": time.time() - started}
    atomic_write_json(job["result_path"], {"config_hash": job["config_hash"], "result": result})
    return result


def _stored_cache(job: dict) -> dict:
    """A cache job's stored timing (what `_run_job` wrote beside the cache), for --report_only."""
    cache_dir = job["config"]["model"]["cache_dir"]
    path = os.path.join(cache_dir, "bench_seconds.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--report_only: no stored cache at {cache_dir!r}; run the bench without --report_only first")
    with open(path) as f:
        return json.load(f)


def _cache_is_current(run) -> bool:
    from fusion.sources.cache import is_current

    run.datamodule.setup("predict")
    return is_current(run.model.hparams.cache_dir, run.model.cache_fingerprint(run.datamodule))


def _run_all(jobs: list[dict], workers: int, stored_only: bool = False) -> list[dict]:
    """Run jobs, reusing a run whose result.json has the same config; longest first.
    `stored_only`: take every job's stored result as it is (config and code unchecked), run nothing."""
    results, pending = [None] * len(jobs), []
    for index, job in enumerate(jobs):
        path = job.get("result_path")
        if path and os.path.isfile(path):
            with open(path) as f:
                stored = json.load(f)
            if stored_only or (stored["config_hash"] == job["config_hash"] and os.path.isfile(job.get("adapter") or path)):
                results[index] = {**stored["result"], "reused": True}
                continue
        if stored_only:
            raise FileNotFoundError(f"--report_only: no stored run at {path!r}; run the bench without --report_only first")
        pending.append(index)
    pending.sort(key=lambda i: -jobs[i]["cost"])
    if pending:
        print(f"quality: {len(pending)} runs to do ({len(jobs) - len(pending)} reused), {workers} at a time", flush=True)

    def done(index: int, result: dict, count: int) -> None:
        results[index] = result
        score = f"mean accuracy {result['acc_mean']:.3f}, " if "acc_mean" in result else ""
        print(
            f"quality: [{count}/{len(pending)}] {os.path.basename(os.path.dirname(jobs[index]['log_dir']))}: "
            f"{score}{result['seconds']:.0f} s",
            flush=True,
        )

    if workers > 1 and len(pending) > 1:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(_run_job, jobs[i]): i for i in pending}
            for count, future in enumerate(as_completed(futures), 1):
                done(futures[future], future.result(), count)
    else:
        for count, index in enumerate(pending, 1):
            done(index, _run_job(jobs[index]), count)
    return results


class Planner:
    """Builds the `fusion.train` config of every run from the bench settings."""

    def __init__(self, bench: QualityBench, threads: int):
        self.bench, self.threads = bench, threads
        self.caches: dict[str, tuple[str, dict]] = {}  # cache name -> (pool, settings that differ from train.model)

    def config(self, name: str, seed: int, model: dict) -> tuple[dict, str]:
        config = deep_merge(self.bench.train, {"seed_everything": seed, "model": model})
        config["trainer"]["max_steps"] = self.bench.steps
        log_root = os.path.join(self.bench.output, "runs")
        config["trainer"]["logger"] = {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": log_root, "name": name, "version": 0},
        }
        config["trainer"]["default_root_dir"] = os.path.join(log_root, name)
        return config, os.path.join(log_root, name, "version_0")

    def job(self, kind: str, name: str, seed: int, model: dict, record: dict, cost: float) -> dict:
        config, log_dir = self.config(name, seed, model)
        # A run is reused only for the same config, the same models' weights and the same code.
        weights = {path: _weights(path) for path in [config["model"]["student"], *config["model"].get("sources", [])]}
        config_hash = hashlib.sha256(json.dumps([kind, config, weights, _code_version()], sort_keys=True).encode()).hexdigest()[:16]
        return {
            "kind": kind,
            "config": config,
            "log_dir": log_dir,
            "threads": self.threads,
            "record": record,
            "cost": cost,
            "config_hash": config_hash,
            "result_path": os.path.join(self.bench.output, "runs", name, "result.json"),
        }

    def fusion_settings(self, settings: dict, pool: str):
        """A method's runs in `pool` as the fusion module reads them (`FusionSettings`): `train.model`
        and the method's settings over it, with the pool's sources. Where the sources' outputs
        come from (`source_mode`, `cache_dir`) is the planner's choice and left out."""
        from fusion.stages.fusion_settings import FusionSettings

        model = {
            key: value
            for key, value in (self.bench.train.get("model", {}) | settings).items()
            if key in FusionSettings.names() and key not in ("source_mode", "cache_dir")
        }
        return FusionSettings(**model | {"sources": self.bench.pools[pool]})

    def cache_dir(self, pool: str, settings: dict) -> str:
        """One cache per pool and per value of the settings the cached numbers depend on (with
        unlabeled prompts: per method, since the method decides who answers them)."""
        from fusion.stages.fusion_settings import ANSWER_SETTINGS, SOURCE_OUTPUT_SETTINGS

        base = self.bench.train["model"]
        keys = SOURCE_OUTPUT_SETTINGS + (ANSWER_SETTINGS if self.bench.unlabeled else ())
        overrides = {k: settings[k] for k in keys if k in settings and settings[k] != base.get(k)}
        name = pool + "".join(f"-{k}-{_slug(str(v))}" for k, v in sorted(overrides.items()))
        self.caches.setdefault(name, (pool, overrides))
        return os.path.join(self.bench.output, "cache", name)

    def source_settings(self, pool: str, mode: str, settings: dict) -> dict:
        cache_dir = self.cache_dir(pool, settings) if mode == "cached" else None
        return {"sources": self.bench.pools[pool], "source_mode": mode, "cache_dir": cache_dir}

    def training_jobs(self) -> list[dict]:
        b, jobs = self.bench, []
        chained = {m["after"] for m in b.methods.values() if "after" in m}
        for seed in b.seeds:
            for method, settings in b.methods.items():
                if "after" in settings:
                    continue
                pools = b.run_pools[:1] if self.fusion_settings(settings, "A").pool_independent else b.run_pools
                for pool in pools:
                    run = self.fusion_settings(settings, pool)
                    mode = "online" if not run.method.uses_sources or run.online_only else b.source_mode
                    model = settings | self.source_settings(pool, mode, settings)
                    cost = 1.0 + (0.5 if mode == "online" else 0.0) * run.source_forwards + (3.0 if run.online_only else 0.0)
                    name = f"{pool}-{_slug(method)}-seed{seed}"
                    jobs.append(self.job("fit", name, seed, model, {"method": method, "pool": pool, "seed": seed}, cost))
                    if method in chained:
                        jobs[-1]["adapter"] = os.path.join(self.bench.output, "runs", name, "adapter.ckpt")
        if b.consistency and b.source_mode == "cached":
            c = b.consistency
            model = b.methods[c["method"]] | self.source_settings(c["pool"], "online", b.methods[c["method"]])
            jobs.append(
                self.job(
                    "fit",
                    f"{c['pool']}-{_slug(c['method'])}-seed{c['seed']}-online",
                    c["seed"],
                    model,
                    {"method": c["method"], "pool": c["pool"], "seed": c["seed"], "online": True},
                    5.0,
                )
            )
        return jobs

    def chained_jobs(self, fitted: list[dict]) -> list[dict]:
        """The second stage of each chained method, from its `after` method's adapter, per seed and
        pool (after `fitted`, the training jobs, have run): SRFT, or fusion again (`fusion_stage`)."""
        jobs = []
        for method, settings in self.bench.methods.items():
            if "after" not in settings:
                continue
            kind = "srft" if "srft" in settings else "fusion_stage"
            stage = settings[kind]
            for job in fitted:
                if job["record"].get("method") != settings["after"] or job["record"].get("online"):
                    continue
                record = {**job["record"], "method": method}
                pool, name = record["pool"], f"{record['pool']}-{_slug(method)}-seed{record['seed']}"
                if kind == "srft":
                    config, log_dir = self.config(name, record["seed"], {})
                    init_args = {"student": job["config"]["model"]["student"], "init_from": job["adapter"], **stage.get("model", {})}
                    if "lora" in self.bench.train["model"]:  # the adapter it trains on further
                        init_args.setdefault("lora", self.bench.train["model"]["lora"])
                    if init_args.get("demonstrations") == "cache":  # the answers its fusion run learned along
                        init_args["demonstrations"] = self.cache_dir(pool, self.bench.methods[settings["after"]])
                    config["model"] = {"class_path": "fusion.stages.srft.SRFTModule", "init_args": init_args}
                else:
                    merged = self.bench.methods[settings["after"]] | stage.get("model", {})
                    mode = (
                        "online"
                        if self.fusion_settings(merged, pool).online_only or merged.get("source_mode") == "online"
                        else self.bench.source_mode
                    )
                    config, log_dir = self.config(
                        name, record["seed"], merged | self.source_settings(pool, mode, merged) | {"init_from": job["adapter"]}
                    )
                config["trainer"]["max_steps"] = stage["steps"]
                config_hash = hashlib.sha256(
                    json.dumps([kind, config, job["config_hash"], _code_version()], sort_keys=True).encode()
                ).hexdigest()[:16]
                jobs.append(
                    {
                        "kind": "fit",
                        "config": config,
                        "log_dir": log_dir,
                        "threads": self.threads,
                        "record": record,
                        "cost": 1.0,
                        "config_hash": config_hash,
                        "result_path": os.path.join(os.path.dirname(log_dir), "result.json"),
                    }
                )
        return jobs

    def cache_jobs(self) -> list[dict]:
        """The `predict` runs that write the caches the training jobs read (plan those first)."""
        return [
            self.job(
                "predict",
                f"cache-{name}",
                0,
                {"fusion": "uniform", **overrides, **self.source_settings(pool, "cached", overrides)},
                {},
                1.0,
            )
            for name, (pool, overrides) in self.caches.items()
        ]

    def teacher_jobs(self) -> list[dict]:
        """Per domain of `teacher`, its sources decoding the domain's test prompts together."""
        paths = {os.path.basename(os.path.normpath(p)): p for p in self.bench.pools["A"]}
        return [
            self.job(
                "teacher", f"teacher-{_slug(domain)}", 0, {"fusion": "none", "sources": [paths[n] for n in group]}, {"teacher": domain}, 1.0
            )
            for domain, group in (self.bench.teacher or {}).items()
        ]

    def test_job(self, name: str, student: str, record: dict) -> dict:
        job = self.job("test", name, 0, {"student": student, "fusion": "none", "sources": []}, record, 0.3)
        return job

    def source_jobs(self) -> list[dict]:
        """Each source of either pool answers the test prompts itself, greedily, in its own tokens."""
        paths = list(dict.fromkeys(self.bench.pools["A"] + self.bench.pools["B"]))
        return [
            self.job(
                "source",
                f"source-{_slug(os.path.basename(os.path.normpath(path)))}",
                0,
                {"fusion": "none", "sources": [path]},
                {"source": os.path.basename(os.path.normpath(path))},
                0.3,
            )
            for path in paths
        ]


@functools.cache
def _weights(path: str) -> str:
    from fusion.sources.cache import model_fingerprint

    return model_fingerprint(path)


@functools.cache
def _code_version() -> str:
    """Hash of the fusion package's modules (the bench's own files excluded)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bench = os.path.join(root, "bench")
    digest = hashlib.sha256()
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if os.path.join(directory, d) != bench and d != "__pycache__")
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                digest.update(os.path.relpath(path, root).replace(os.sep, "/").encode() + f.read())
    return digest.hexdigest()[:16]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


# ------------------------------------------------------------------------------------ merging


def build_merged(bench: QualityBench) -> list[tuple[str, str, str]]:
    """Build (or reuse) the LoRA zoo and save every merge; -> (method, pool, merged model dir)."""
    from fusion import merging, zoo

    m = bench.merging
    recipes = [zoo.SourceRecipe(**{**r, "architecture": zoo.Architecture(**r.get("architecture", {}))}) for r in m.zoo["sources"]]
    if m.steps is not None:
        for recipe in recipes:
            recipe.steps = m.steps
    settings = {k: v for k, v in m.zoo.items() if k != "sources"}
    zoo.build_zoo(sources=recipes, student=None, **settings)
    bases = {r.base for r in recipes}
    if len(bases) != 1:
        raise ValueError(f"merging.zoo: every recipe must adapt the same base (the student's), got {sorted(bases)}")
    base, built = bases.pop(), []
    for method, options in m.methods.items():
        for pool, names in m.pools.items():
            directory = os.path.join(bench.output, "merged", f"{_slug(method)}-{pool}")
            adapters = [os.path.join(settings["output_dir"], name) for name in names]
            if "mergekit" in options:
                arguments = {k: v for k, v in options.items() if k != "mergekit"}
                merging.merge_models(adapters, directory, method=options["mergekit"], base=base, **arguments)
            else:
                merging.save_merged(merging.merge_adapters(base, adapters, **options), base, directory)
            built.append((method, pool, directory))
    return built


# ------------------------------------------------------------------------------------ the bench


@functools.cache
def _suite_gold(data_json: str) -> dict[str, dict] | None:
    """The gold rows of the prompts without gold of a `train.data` config (JSON), by row key: the
    embedded suite's seeded generators draw them again with their answers. None for other data."""
    from fusion.data import tasks
    from fusion.data.datamodule import FusionDataModule, unlabeled_row
    from fusion.sources.cache import row_key

    data = FusionDataModule(**json.loads(data_json))
    if data.hparams.dataset != "suite" or not data.hparams.unlabeled_size:
        return None
    rows = tasks.build_splits(data.hparams.domains, data.suite_sizes(), data.hparams.seed)["unlabeled"]
    return {row_key(unlabeled_row(row["prompt"], row["domain"])): row for row in rows}


def answer_accuracy(directory: str, data: dict) -> dict[str, float] | None:
    """Per domain, the share of a cache's answers to the prompts without gold that the task's
    scorer accepts: how often what the student learns along is right (suite data only)."""
    from fusion.sources.cache import read_answers
    from fusion.stages.evaluation import correct

    gold = _suite_gold(json.dumps(data, sort_keys=True))
    if gold is None:
        return None
    right: dict[str, list[bool]] = {}
    for key, answer in read_answers(directory).items():
        row = gold[key]
        right.setdefault(row["domain"], []).append(correct([answer["text"]], [row])[0])
    return {domain: sum(v) / len(v) for domain, v in sorted(right.items())}


def answer_costs(planner: Planner, name: str, settings: dict, cache_seconds: dict[str, float]) -> dict:
    """Per pool, as measured when the cache was written: sources that wrote an answer per
    unlabeled prompt, empty answers, each source's share of the answers used, how often the
    answers are right per domain (suite data), and the seconds the cache took (its labelled rows
    included)."""
    from fusion.sources.cache import answer_summary

    run = planner.fusion_settings(settings, "A")
    if not run.method.uses_sources:
        return {"generations_per_prompt": {p: 0.0 for p in planner.bench.pools}, "cache_seconds": {p: 0.0 for p in planner.bench.pools}}
    costs: dict[str, dict] = {"generations_per_prompt": {}, "answers": {}, "answer_accuracy": {}, "cache_seconds": {}}
    for pool in planner.bench.run_pools:
        pool_run = planner.bench.run_pools[0] if run.pool_independent else pool
        directory = planner.cache_dir(pool_run, settings)
        summary = answer_summary(directory)
        names = [os.path.basename(os.path.normpath(p)) for p in planner.bench.pools[pool_run]]
        costs["generations_per_prompt"][pool] = summary["generations_per_prompt"]
        costs["answers"][pool] = {
            "prompts": summary["prompts"],
            "empty": summary["empty_answers"],
            "writers": {n: c / max(1, summary["prompts"]) for n, c in zip(names, summary["writers"]) if c},
        }
        costs["cache_seconds"][pool] = round(cache_seconds.get(os.path.normpath(directory), 0.0), 1)
        accuracy = answer_accuracy(directory, planner.bench.train.get("data", {}))
        if accuracy is not None:
            costs["answer_accuracy"][pool] = accuracy
    return costs


def run(bench: QualityBench, quick: bool = False, config_yaml: str = "", report_only: bool = False, arguments: list[str] = ()) -> dict:
    """Run the whole bench and write its report: the source caches, every method's runs, the
    baselines (the untrained student, the weight merges, each source alone) and the chained
    stages, then report.json, report.md and the plots under `bench.output`. A run whose config is
    unchanged is reused; `report_only` runs nothing and reports the stored runs. -> the report."""
    started = time.time()
    planner = Planner(bench, bench.threads)
    os.makedirs(bench.output, exist_ok=True)
    jobs = planner.training_jobs()
    cache_seconds = _build_caches(planner, report_only, started)
    methods = _method_rows(planner, cache_seconds)
    tests = _baseline_jobs(planner, methods)
    results = _run_all(jobs + tests, bench.workers, report_only)
    sources = {r["source"]: r["acc"] for r in results if "source" in r}
    sources_val = {r["source"]: r["val_acc"] for r in results if "source" in r}
    teachers = {r["teacher"]: r for r in results if "teacher" in r}
    results = [r for r in results if "source" not in r and "teacher" not in r]
    results += _run_chained(planner, jobs, results, report_only)
    runs = _pool_rows(results, methods, bench.run_pools)
    report = _report(
        bench, methods, results, runs, sources, sources_val, quick=quick, report_only=report_only, arguments=arguments, started=started
    )
    report["fused_teacher"] = report_lib.fused_teachers(bench.teacher or {}, teachers, report["best_source"], report["results"])
    written = report_lib.write_report(report, runs, config_yaml, bench.output)
    print(report_lib.markdown(report, "").split("## Configuration")[0])
    print("wrote " + ", ".join(written))
    return report


def _build_caches(planner: Planner, report_only: bool, started: float) -> dict[str, float]:
    """Write each pool's source cache that the planned runs read (or, with `report_only`, take the
    stored ones). -> the seconds each cache took to write, by its directory."""
    if not planner.caches:
        return {}
    jobs = planner.cache_jobs()
    built = [_stored_cache(job) for job in jobs] if report_only else _run_all(jobs, planner.bench.workers)
    print(f"quality: caches ready after {time.time() - started:.0f} s ({[round(r['seconds']) for r in built]} s)", flush=True)
    return {os.path.normpath(r["cache_dir"]): r["seconds"] for r in built}


def _method_rows(planner: Planner, cache_seconds: dict[str, float]) -> dict[str, dict]:
    """The report's description of each method: its settings (a chained method's are its fusion
    stage's), its source forwards per sequence in each pool, what writing its cache cost (cached
    label-scarce runs), and whether one run serves both pools."""
    bench = planner.bench
    resolved = {
        name: bench.methods[s["after"]] | s.get("fusion_stage", {}).get("model", {}) | s if "after" in s else s
        for name, s in bench.methods.items()
    }  # a chain: its fusion's settings (and its second fusion stage's)
    methods = {
        name: {**settings, "source_forwards_per_seq": {p: planner.fusion_settings(settings, p).source_forwards for p in bench.pools}}
        for name, settings in resolved.items()
    }
    if bench.unlabeled and bench.source_mode == "cached":
        methods = {
            name: m | answer_costs(planner, name, m, cache_seconds)
            if not planner.fusion_settings(m, "A").online_only and m.get("source_mode") != "online"
            else m
            for name, m in methods.items()
        }
    for name, settings in resolved.items():
        if planner.fusion_settings(settings, "A").pool_independent:
            methods[name] |= {
                "shared_with": "pool A run",
                "note": "independent of the pool (runs no source, or only the domain's specialist): trained once per seed, reported for both pools",
            }
    return methods


def _baseline_jobs(planner: Planner, methods: dict[str, dict]) -> list[dict]:
    """The test runs the methods are compared with: the student's base model untrained, each weight
    merge of LoRA specialists (built here), and each source answering alone. Adds the rows of the
    base and the merges to `methods`."""
    bench = planner.bench
    tests = [planner.test_job("base-student", bench.train["model"]["student"], {"method": BASE, "pool": "A", "seed": 0})]
    methods[BASE] = {
        "fusion": None,
        "source_forwards_per_seq": {"A": 0, "B": 0},
        "shared_with": "pool A run",
        "note": "the student's base model before any training",
    }
    if bench.merging:
        merge_started = time.time()
        for method, pool, directory in build_merged(bench):
            label = f"merge: {method}"
            tests.append(planner.test_job(f"{pool}-merge-{_slug(method)}", directory, {"method": label, "pool": pool, "seed": 0}))
            methods.setdefault(
                label,
                {
                    "fusion": None,
                    "source_forwards_per_seq": {p: 0 for p in bench.pools},
                    "note": "LoRA specialists of the student's base merged once (no training, no seed); 0 source forwards",
                },
            )
        print(f"quality: LoRA zoo and merges ready after {time.time() - merge_started:.0f} s", flush=True)
    return tests + planner.source_jobs() + planner.teacher_jobs()


def _run_chained(planner: Planner, jobs: list[dict], results: list[dict], report_only: bool) -> list[dict]:
    """Run each chained method's second stage from its fusion run's adapter (after those have run).
    -> its results, each row's wall time both stages'."""
    chained = planner.chained_jobs(jobs)
    if not chained:
        return []
    fused = {(r["method"], r["pool"], r["seed"]): r["seconds"] for r in results if not r.get("online")}
    after = {name: s["after"] for name, s in planner.bench.methods.items() if "after" in s}
    return [
        r | {"seconds": r["seconds"] + fused[(after[r["method"]], r["pool"], r["seed"])]}
        for r in _run_all(chained, planner.bench.workers, report_only)
    ]


def _pool_rows(results: list[dict], methods: dict[str, dict], run_pools: list[str]) -> list[dict]:
    """The rows the report summarizes: every run but the online consistency run, and a pool B
    copy of each run of a method that one pool A run serves for both pools."""
    runs = []
    for result in results:
        if result.get("online"):
            continue
        runs.append(result)
        if methods[result["method"]].get("shared_with") and result["pool"] == "A" and "B" in run_pools:
            runs.append(dict(result, pool="B"))
    return runs


def _consistency(bench: QualityBench, results: list[dict], runs: list[dict]) -> dict | None:
    """The consistency check: the run trained online against the same run trained from the cache
    (accuracy, its difference, wall time); None when the bench has none."""
    if not (bench.consistency and bench.source_mode == "cached"):
        return None
    c = bench.consistency
    online = next(r for r in results if r.get("online"))
    cached = next(r for r in runs if (r["method"], r["pool"], r["seed"]) == (c["method"], c["pool"], c["seed"]))
    return {
        **c,
        "cached": {"acc": cached["acc"], "acc_mean": cached["acc_mean"]},
        "online": {"acc": online["acc"], "acc_mean": online["acc_mean"]},
        "difference": online["acc_mean"] - cached["acc_mean"],
        "max_domain_difference": max(abs(online["acc"][d] - cached["acc"][d]) for d in cached["acc"]),
        "cached_seconds": cached["seconds"],
        "online_seconds": online["seconds"],
    }


def _report(
    bench: QualityBench,
    methods: dict[str, dict],
    results: list[dict],
    runs: list[dict],
    sources: dict[str, dict],
    sources_val: dict[str, dict],
    *,
    quick: bool,
    report_only: bool,
    arguments: list[str],
    started: float,
) -> dict:
    """The report (what report.json holds): the settings, each method's results per pool with its
    ratio to the best source, the learning curves, the consistency check, the pass/fail criteria
    and the runs' wall times."""
    consistency = _consistency(bench, results, runs)
    summary = report_lib.summarize(runs, methods)
    pool_names = {pool: [os.path.basename(os.path.normpath(p)) for p in paths] for pool, paths in bench.pools.items()}
    best = report_lib.add_ratios(summary, runs, sources, pool_names)
    curves = report_lib.learning_curves(runs, sources_val, pool_names)
    oracle = bench.train["model"].get("oracle") or {}
    return {
        "quick": quick,
        "provenance": report_lib.provenance(list(arguments)),
        "report_only": report_only,
        "seeds": bench.seeds,
        "steps": bench.steps,
        "pools": bench.pools,
        "source_mode": bench.source_mode,
        "sources": sources,
        "best_source": best,
        "learning_curves": curves,
        "results": summary,
        "consistency": consistency,
        "criteria": report_lib.merge_criteria(
            report_lib.criteria_unlabeled(summary, methods) if bench.unlabeled else report_lib.criteria(summary, methods, oracle),
            report_lib.criteria_ratio(summary, methods),
            report_lib.criteria_floor(summary, BASE),
        ),
        "runtime_seconds": time.time() - started,
        "runs_reused": sum(bool(r.get("reused")) for r in results),
        "runs": len(results),
        "run_seconds": {f"{r['pool']}/{r['method']}/seed{r['seed']}": round(r["seconds"], 1) for r in results},
    }


def main(argv: list[str] | None = None) -> dict:
    from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

    parser = ArgumentParser(prog="python -m fusion.bench quality", description=__doc__)
    parser.add_argument("--config", action=ActionConfigFile, help="the bench YAML, e.g. configs/bench.yaml")
    parser.add_argument("--quick", action=ActionYesNo, default=False, help="apply quick_settings: fewer seeds and steps")
    parser.add_argument(
        "--report_only",
        action=ActionYesNo,
        default=False,
        help="rewrite the report from the runs stored under output, as they are (their configs and the code "
        "they ran are not checked; a missing run is an error); nothing is trained",
    )
    parser.add_class_arguments(QualityBench)
    arguments = sys.argv[1:] if argv is None else list(argv)
    namespace = parser.parse_args(arguments).as_dict()
    sys.argv = sys.argv[:1]  # every run's arguments go to fusion.train explicitly
    quick, report_only = namespace.pop("quick"), namespace.pop("report_only")
    settings = {k: v for k, v in namespace.items() if k not in ("config", "__path__")}
    if quick:
        settings = deep_merge(settings, settings["quick_settings"])
    bench = QualityBench(**settings)
    config_yaml = yaml.safe_dump({"quick": quick, **{k: v for k, v in settings.items() if k != "quick_settings"}}, sort_keys=False)
    return run(bench, quick, config_yaml, report_only, arguments)


if __name__ == "__main__":
    main()
