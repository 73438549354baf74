"""The offline cache built on Ray (`fusion.cache_ray`) against the one `predict` writes.

The Ray tests share one local Ray (2 CPUs, a 200 MB object store) and one cache written by
`fusion.train predict` on the tiny zoo: the selector (k = 2), 16 gold answers and 6 prompts
without one per domain, batches of 8, so that the selector is prefitted, routes every prompt,
its top source answers and two sources score along each answer. Every Ray build must write the
same bytes: the same fingerprint.json and, shard by shard, the same manifest (each file's size
and sha256), hence every record bit for bit.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import sys
import time

import pytest
import yaml

from fusion import cache_ray
from fusion.cache_ray import RaySettings, build_cache, plan_shards, restore_signal_handlers, saved_signal_handlers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWO_WORKERS = RaySettings(actors_per_source=2, student_actors=1, cpus_per_actor=0.125)
ONE_WORKER = RaySettings(actors_per_source=1, cpus_per_actor=0.25)


def _faults_hook() -> None:
    """Ray's `worker_process_setup_hook` in these tests: once a test creates `$FUSION_TEST_FAULTS/armed`,
    the first scoring actor to take a batch dies there (`os._exit`, as a killed process does),
    once: it leaves `killed` behind."""
    directory = os.environ.get("FUSION_TEST_FAULTS")
    if not directory:
        return
    process = cache_ray.SourceStage.process

    def dying(self, item: dict) -> dict:
        if self.role == "score" and os.path.exists(os.path.join(directory, "armed")):
            try:
                os.close(os.open(os.path.join(directory, "killed"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                os._exit(1)
        return process(self, item)

    cache_ray.SourceStage.process = dying


# ------------------------------------------------------------------ fast: no Ray, no zoo


def test_shards_are_cut_as_predict_cuts_them():
    # CacheWriter flushes once the pending rows reach shard_rows, after a whole batch, and at the end.
    assert plan_shards([8, 8, 8, 8, 8, 4], 8) == [[0], [1], [2], [3], [4], [5]]
    assert plan_shards([8, 8, 8, 8, 8, 4], 4096) == [[0, 1, 2, 3, 4, 5]]
    assert plan_shards([8, 8, 8, 8, 8, 4], 20) == [[0, 1, 2], [3, 4, 5]]


def test_settings_are_checked_naming_their_option():
    with pytest.raises(ValueError, match=r"--ray.actors_per_source must be at least 1, got 0"):
        RaySettings(actors_per_source=0)
    with pytest.raises(ValueError, match=r"--ray.answers must be one of \('auto', 'vllm', 'transformers'\), got 'tgi'"):
        RaySettings(answers="tgi")
    with pytest.raises(ValueError, match=r"--ray.cpus_per_actor must be above 0"):
        RaySettings(cpus_per_actor=0)


def test_without_ray_the_command_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(SystemExit) as stop:
        cache_ray.command_line(["--config", "configs/quickstart.yaml"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: building the offline cache on Ray (python -m fusion.cache_ray) needs ray[data], which is not installed")
    assert "pip install 'fusion[ray]' (from a clone: pip install -e '.[ray]')" in err.splitlines()[0]


class _NoRay:
    """Stands in for `ray` where a test must not start one."""

    @staticmethod
    def is_initialized() -> bool:
        return False

    @staticmethod
    def init(**kwargs):
        raise AssertionError("ray.init was called for an address that does not answer")


def test_an_address_that_does_not_answer_stops_within_seconds():
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}", "10.255.255.1:6379"):
        started = time.perf_counter()
        with pytest.raises(ConnectionError, match=rf"--ray.address '{address}': no Ray cluster answers at .*waited at most 1 s"):
            cache_ray.connect(_NoRay, RaySettings(address=address, connect_timeout=1))
        assert time.perf_counter() - started < 3
    with pytest.raises(ValueError, match=r"--ray.address 'head-node': expected local, auto, host:port or ray://host:port"):
        cache_ray.connect(_NoRay, RaySettings(address="head-node"))


def test_pools_that_do_not_fit_the_cluster_are_refused_before_any_work():
    class TwoCPUs:
        @staticmethod
        def cluster_resources() -> dict:
            return {"CPU": 2.0}

    pools = [cache_ray.Pool(name, cache_ray.SourceStage, {}, 2, cpus=0.5) for name in ("student", "score spell", "score sum")]
    with pytest.raises(
        ValueError,
        match=r"the pipeline's 3 actor pools \(student 2, score spell 2, score sum 2 actors\) need 3 CPUs at once, the Ray cluster has 2: "
        r"lower --ray.cpus_per_actor",
    ):
        cache_ray.check_resources(TwoCPUs, pools)
    cache_ray.check_resources(TwoCPUs, pools[:2])  # 2 CPUs: fits


def test_an_actors_error_reaches_the_driver_with_its_type_and_message():
    inner = cache_ray._stage_error(OSError("model.sources[1]: could not load '/data/sum'"))
    outer = RuntimeError(f"ActorDiedError: The actor died because of an error raised in its creation task\n{inner}\nmore text")
    found = cache_ray.fusion_error(outer)
    assert type(found) is OSError and str(found) == "model.sources[1]: could not load '/data/sum'"
    assert cache_ray.fusion_error(RuntimeError("an error no actor of ours raised")) is None


# ------------------------------------------------------------------ against predict, on a local Ray


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """A local Ray of 2 CPUs and a 200 MB object store for this module's builds; its workers can
    import these tests (for `_faults_hook`) and read the session's FUSION_CACHE."""
    ray = pytest.importorskip("ray")
    faults = tmp_path_factory.mktemp("faults")
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    handlers = saved_signal_handlers()
    ray.init(
        num_cpus=2,
        object_store_memory=200 * 2**20,
        include_dashboard=False,
        runtime_env={
            "worker_process_setup_hook": "tests.test_cache_ray._faults_hook",
            "env_vars": {"FUSION_TEST_FAULTS": str(faults), "PYTHONPATH": path},
        },
    )
    yield faults
    ray.shutdown()
    restore_signal_handlers(handlers)  # Ray's SIGTERM handler would end later tests' runs with exit code 15


@pytest.fixture(scope="module")
def predicted(tiny_zoo, tmp_path_factory):
    """The tiny selector config and the cache `fusion.train predict` writes for it."""
    from fusion.train import main
    from tests.conftest import tiny_config

    root = tmp_path_factory.mktemp("ray_cache")
    config = tiny_config(
        tiny_zoo,
        str(root / "runs"),
        fusion="selector",
        top_k=2,
        source_mode="cached",
        cache_dir=str(root / "predict"),
        response_max_new_tokens=8,
        selector_prefit_steps=50,
    )
    config["data"]["unlabeled_size"] = 6
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["predict", "--config", str(path)])
    return {"config": str(path), "cache": str(root / "predict"), "root": root}


def _manifests(directory: str) -> dict[str, dict]:
    out = {}
    for shard in sorted(glob.glob(os.path.join(directory, "shard-*"))):
        with open(os.path.join(shard, "manifest.json")) as f:
            out[os.path.basename(shard)] = json.load(f)
    return out


def _records(directory: str) -> dict[str, dict]:
    from fusion.sources.cache import _open_shard, list_shards

    return {row["key"]: row for shard in list_shards(directory) for row in _open_shard(shard)}


def _read(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def ray_built(local_ray, predicted):
    """The same cache built on the local Ray with 2 actors per source."""
    directory = str(predicted["root"] / "ray2")
    result = build_cache(["--config", predicted["config"], f"--model.cache_dir={directory}"], TWO_WORKERS)
    return {"cache": directory, "result": result}


@pytest.mark.slow
def test_ray_cache_equals_predicts_bit_for_bit(predicted, ray_built):
    ours, theirs = ray_built["cache"], predicted["cache"]
    assert _read(os.path.join(ours, "fingerprint.json")) == _read(os.path.join(theirs, "fingerprint.json"))
    assert ray_built["result"].rows == 44 and ray_built["result"].written == ["shard-r0-00000"]
    # The same shard files, byte for byte: every file's size and sha256.
    assert _manifests(ours) == _manifests(theirs) and list(_manifests(ours)) == ["shard-r0-00000"]
    records, expected = _records(ours), _records(theirs)
    assert list(records) == list(expected) and len(records) == 44  # row keys, in predict's order
    answered = [r for r in records.values() if r["answer"] is not None]
    assert len(answered) == 12 and all(len(r["sources"]) == 2 for r in answered)
    for key, record in records.items():
        assert record == expected[key]  # ids, float16 log-probs, CE, answers: equal, not close


@pytest.mark.slow
def test_a_student_trained_from_either_cache_learns_the_same(predicted, ray_built):
    from fusion.train import main

    losses = {}
    for name, cache in (("predict", predicted["cache"]), ("ray", ray_built["cache"])):
        runs = predicted["root"] / f"fit_{name}"
        main(
            [
                "fit",
                "--config",
                predicted["config"],
                f"--model.cache_dir={cache}",
                f"--trainer.default_root_dir={runs}",
                f"--trainer.logger.init_args.save_dir={runs}",
                "--trainer.max_steps=3",
                "--trainer.val_check_interval=3",
            ]
        )
        (log,) = glob.glob(str(runs / "run" / "version_*" / "metrics.csv"))
        with open(log) as f:
            rows = list(csv.DictReader(f))
        losses[name] = [float(r["train/loss"]) for r in rows if r.get("train/loss")] + [
            float(r["val/acc_mean"]) for r in rows if r.get("val/acc_mean")
        ]
    assert len(losses["ray"]) >= 4 and losses["ray"] == losses["predict"]


@pytest.mark.slow
def test_a_killed_actor_is_retried_and_the_cache_is_identical(local_ray, predicted):
    directory = str(predicted["root"] / "killed")
    (local_ray / "armed").touch()
    try:
        result = build_cache(["--config", predicted["config"], f"--model.cache_dir={directory}"], ONE_WORKER)
    finally:
        (local_ray / "armed").unlink()
    assert (local_ray / "killed").exists()  # a scoring actor died on its first batch
    assert result.written == ["shard-r0-00000"]
    assert _manifests(directory) == _manifests(predicted["cache"])
    assert _records(directory) == _records(predicted["cache"])


class _Interrupted(Exception):
    pass


@pytest.mark.slow
def test_an_interrupted_build_resumes_from_its_shards(local_ray, predicted):
    """Shards of 8 rows (one per batch: 4 labelled, then 8 and 4 answered prompts); the build is
    stopped after its second shard and run again: the two shards stay as they are (the selector's
    prefit reads their CE from disk), the four others are built, and every record is predict's."""
    directory = str(predicted["root"] / "resumed")
    args = ["--config", predicted["config"], f"--model.cache_dir={directory}"]
    settings = RaySettings(actors_per_source=1, cpus_per_actor=0.25, shard_rows=8)
    written = []

    def stop_after_two(path: str) -> None:
        written.append(os.path.basename(path))
        if len(written) == 2:
            raise _Interrupted

    with pytest.raises(_Interrupted):
        build_cache(args, settings, on_shard=stop_after_two)
    os.makedirs(os.path.join(directory, "shard-r0-00005.1a2b3c4d.tmp"))  # what a writer killed mid-shard leaves
    kept = {name: os.stat(os.path.join(directory, name, "manifest.json")).st_mtime_ns for name in written}
    assert sorted(os.listdir(directory)) == sorted(["fingerprint.json", "shard-r0-00005.1a2b3c4d.tmp", *written])

    result = build_cache(args, settings)
    names = [f"shard-r0-{i:05d}" for i in range(6)]
    assert result.reused == sorted(written) and sorted(result.written + result.reused) == names
    assert {name: os.stat(os.path.join(directory, name, "manifest.json")).st_mtime_ns for name in written} == kept
    assert sorted(os.listdir(directory)) == ["fingerprint.json", *names]
    assert [m["rows"] for m in _manifests(directory).values()] == [8, 8, 8, 8, 8, 4]
    assert _records(directory) == _records(predicted["cache"])
    assert _read(os.path.join(directory, "fingerprint.json")) == _read(os.path.join(predicted["cache"], "fingerprint.json"))

    again = build_cache(args, settings)  # complete: nothing to build
    assert again.written == [] and again.reused == names


@pytest.mark.slow
def test_a_source_a_worker_cannot_read_stops_the_build_naming_its_key(local_ray, predicted, tiny_zoo, tmp_path):
    """The driver reads the source's config and tokenizer; its weights are missing where the
    actors load it (a partial copy on a worker): the build stops, naming model.sources[1]."""
    broken = tmp_path / "sum"
    shutil.copytree(os.path.join(tiny_zoo, "sum"), broken)
    for weights in broken.glob("*.safetensors"):
        weights.unlink()
    sources = json.dumps([os.path.join(tiny_zoo, "spell"), str(broken), os.path.join(tiny_zoo, "noise")])
    args = ["--config", predicted["config"], f"--model.cache_dir={tmp_path / 'cache'}", "--model.sources", sources]
    started = time.perf_counter()
    with pytest.raises(OSError, match=r"^model\.sources\[1\]: could not load '.*sum'"):
        build_cache(args, ONE_WORKER)
    # A guard against retrying forever, not a speed goal: on a loaded 2-core machine the stop took 224 s.
    assert time.perf_counter() - started < 600


@pytest.mark.slow
def test_the_bench_times_predict_and_ray_and_checks_their_bytes(local_ray, predicted, tmp_path):
    from fusion.bench.__main__ import main as bench

    output = tmp_path / "bench"
    bench(["ray_cache", "--workers", "1", "--output", str(output), "--config", predicted["config"]])
    report = _read(str(output / "report.json"))
    assert report["prompts"] == 44 and report["sources"] == 3 and report["cpus"] == 2
    assert [(b["build"], b["workers"], b["equal"]) for b in report["builds"]] == [
        ("fusion.train predict", None, True),
        ("fusion.cache_ray", 1, True),
    ]
    ray_build = report["builds"][1]
    assert ray_build["cpus_per_actor"] == pytest.approx(2 / 7)  # the student's pool and 2 per source, at once
    assert set(ray_build["busy"]) == {"student", *(f"{role} {n}" for role in ("answer", "score") for n in ("spell", "sum", "noise"))}
    assert sum(ray_build["phases"].values()) <= ray_build["seconds"]
    text = (output / "report.md").read_text()
    assert text.startswith("# The offline cache on Ray against predict\n\n`python -m fusion.bench ray_cache --workers 1 --output")
    assert "| fusion.cache_ray | 1 (0.286 CPU each) |" in text and "| yes |" in text
    assert not (output / "caches").exists()
