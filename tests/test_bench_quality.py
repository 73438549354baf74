"""The quality benchmark's pieces: report math on hand-made metrics, and weight merging on the tiny zoo."""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import pytest
import torch
import yaml

from fusion import merging, zoo
from fusion.bench import _quality_report as report_lib
from fusion.bench import quality
from fusion.data.tokenizer import load_tokenizer

from .conftest import DOMAINS, TINY, reference_test_metrics, tiny_config


def _run(method, pool, seed, acc, selection=None):
    run = {"method": method, "pool": pool, "seed": seed, "acc": acc, "acc_mean": sum(acc.values()) / len(acc)}
    return run | ({"selection_by_domain": selection} if selection else {})


PICKS = {"d1": {"s1": 1.0, "s2": 0.0, "noise": 0.0}, "d2": {"s1": 0.25, "s2": 0.75, "noise": 0.0}}
RUNS = [
    _run("avgce", "A", 0, {"d1": 0.8, "d2": 0.4}),
    _run("avgce", "A", 1, {"d1": 0.6, "d2": 0.4}),
    _run("avgce", "B", 0, {"d1": 0.5, "d2": 0.5}),
    _run("avgce", "B", 1, {"d1": 0.5, "d2": 0.3}),
    _run("uniform", "A", 0, {"d1": 0.8, "d2": 0.4}),
    _run("uniform", "B", 0, {"d1": 0.4, "d2": 0.4}),
    _run("mince", "A", 0, {"d1": 0.6, "d2": 0.5}),
    _run("mince", "B", 0, {"d1": 0.7, "d2": 0.5}),
    _run("selector", "A", 0, {"d1": 0.7, "d2": 0.5}, PICKS),
    _run("selector", "B", 0, {"d1": 0.7, "d2": 0.45}, PICKS),
    _run("oracle", "A", 0, {"d1": 0.9, "d2": 0.5}),
    _run("oracle", "A", 1, {"d1": 0.7, "d2": 0.5}),
]
METHODS = {
    name: {"fusion": name, "source_forwards_per_seq": {"A": n, "B": n + 1}}
    for name, n in (("avgce", 2), ("uniform", 2), ("mince", 2), ("selector", 1), ("oracle", 1))
}


def test_summary_interference_and_criteria(tmp_path):
    summary = report_lib.summarize(RUNS, METHODS)
    avgce = summary["avgce"]
    assert avgce["A"]["acc"] == pytest.approx({"d1": 0.7, "d2": 0.4})
    assert avgce["A"]["acc_mean"] == pytest.approx(0.55) and avgce["A"]["acc_mean_std"] == pytest.approx(0.1 / 2**0.5)
    # From the seed means: (max(0, 0.7 - 0.5) + max(0, 0.4 - 0.4)) / 2; per seed, paired: 0.15 and 0.10.
    assert avgce["A"]["interference"] == pytest.approx(0.1) == avgce["B"]["interference"]
    assert avgce["A"]["interference_per_seed_mean"] == pytest.approx(0.125)
    assert avgce["A"]["interference_per_seed_std"] == pytest.approx(0.05 / 2**0.5)
    assert summary["uniform"]["A"]["interference"] == pytest.approx(0.2)
    assert summary["selector"]["B"]["interference"] == pytest.approx(0.025)  # only d2 lost 0.05
    assert summary["selector"]["B"]["source_forwards_per_seq"] == 2
    # Specialist gap against the oracle's seed means (0.8, 0.5), and per seed against that seed's oracle run.
    assert avgce["A"]["specialist_gap"] == pytest.approx(0.1) and avgce["B"]["specialist_gap"] == pytest.approx(0.2)
    assert avgce["A"]["specialist_gap_per_seed_mean"] == pytest.approx(0.1) and avgce["A"]["specialist_gap_per_seed_std"] == pytest.approx(
        0.0
    )
    assert summary["uniform"]["B"]["specialist_gap"] == pytest.approx(0.25)
    assert summary["uniform"]["B"]["specialist_gap_per_seed_mean"] == pytest.approx(0.3)  # seed 0's oracle: (0.9, 0.5)
    assert "specialist_gap" not in summary["oracle"]["A"]

    checks = report_lib.criteria(summary, METHODS, {"d1": "s1", "d2": "s2"})["selector"]
    assert checks["interference_at_most_half"]["pass"]  # 0.025 <= 0.05 and <= 0.1
    assert checks["specialist_gap_at_most_half"]["B"]["pass"]  # 0.075 <= 0.1 (avgce) and <= 0.125 (uniform)
    assert not checks["specialist_gap_at_most_half"]["A"]["pass"]  # 0.05 > 0.5 * 0.05 (uniform)
    assert checks["acc_at_least_mince"]["A"]["pass"] and not checks["acc_at_least_mince"]["B"]["pass"]  # 0.6 >= 0.55; 0.575 < 0.6
    assert checks["heatmap_picks_specialist"]["A"]["pass"]
    assert checks["heatmap_picks_specialist"]["A"]["specialist_share"] == {"d1": 1.0, "d2": 0.75}

    report = {
        "quick": True,
        "seeds": [0, 1],
        "results": summary,
        "criteria": {"selector": checks},
        "consistency": None,
        "runtime_seconds": 1.0,
    }
    written = report_lib.write_report(report, RUNS, "seeds: [0, 1]\n", str(tmp_path))
    assert sorted(os.path.basename(p) for p in written) == [
        "accuracy.png",
        "interference.png",
        "report.json",
        "report.md",
        "selection_heatmap.png",
    ]
    assert json.loads((tmp_path / "report.json").read_text())["results"]["avgce"]["A"]["interference"] == pytest.approx(0.1)
    assert (
        "| avgce | A | 2 | 0.70 | 0.40 | 0.550 ± 0.071 | 0.100 (0.125 ± 0.035) | 0.100 (0.100 ± 0.000) |"
        in (tmp_path / "report.md").read_text()
    )


def test_new_recipe_fields_keep_old_fingerprints():
    """Cards written before `base`, `lora` and `seed` existed are still reused: the fields are left out at their defaults."""
    recipe = zoo.SourceRecipe("spell", domains=["spell_backward"], architecture=TINY)
    fingerprint = zoo.recipe_fingerprint(recipe)
    assert "base" not in fingerprint and "lora" not in fingerprint and "seed" not in fingerprint
    assert fingerprint == {k: v for k, v in asdict(recipe).items() if k not in ("base", "lora", "seed")}
    assert zoo.recipe_fingerprint(zoo.SourceRecipe("spell", architecture=TINY, seed=7))["seed"] == 7


@torch.no_grad()
def adapter_delta(adapter: str, base: str) -> dict[str, torch.Tensor]:
    """Per base weight, the update B A * scaling an adapter adds to it."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(zoo.AutoModelForCausalLM.from_pretrained(base), adapter)
    before = {k: v.clone() for k, v in zoo.AutoModelForCausalLM.from_pretrained(base).state_dict().items()}
    after = model.merge_and_unload().state_dict()
    return {k: after[k] - before[k] for k in before if not torch.equal(after[k], before[k])}


@pytest.mark.slow
def test_lora_zoo_merge_and_test_path(tiny_zoo, tmp_path, monkeypatch):
    """LoRA specialists of the student's base, merged by peft, evaluated by fusion.train's test path."""
    base = os.path.join(tiny_zoo, "student")
    lora = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
    settings = {
        "zoo": {
            "output_dir": str(tmp_path / "lora"),
            "domains": DOMAINS,
            "examples_per_domain": 40,
            "batch_size": 8,
            "test_size": 2,
            "workers": 1,
            "sources": [
                {"name": "l-spell", "domains": ["spell_backward"], "steps": 3, "learning_rate": 0.01, "base": base, "lora": lora},
                {"name": "l-sum", "domains": ["chain_sum"], "steps": 3, "learning_rate": 0.01, "base": base, "lora": lora},
                {"name": "l-noise", "kind": "random", "base": base, "lora": lora},
            ],
        },
        "pools": {"A": ["l-spell", "l-sum"], "B": ["l-spell", "l-sum", "l-noise"]},
        "methods": {
            "mean": {"combination_type": "cat", "weights": "mean"},
            "mean (mergekit)": {"mergekit": "task_arithmetic", "weights": "mean"},
        },
    }
    train = tiny_config(tiny_zoo, str(tmp_path / "unused"))
    train["data"]["test_size"] = 2
    bench = quality.QualityBench(
        train=train,
        pools={"A": train["model"]["sources"][:2], "B": train["model"]["sources"]},
        methods={"none": {"fusion": "none"}},
        merging=settings,
        workers=1,
        output=str(tmp_path / "out"),
    )
    built = quality.build_merged(bench)
    assert [(m, p) for m, p, _ in built] == [("mean", "A"), ("mean", "B"), ("mean (mergekit)", "A"), ("mean (mergekit)", "B")]
    # mergekit's task arithmetic over the folded adapters is peft's exact `cat` merge, per pool.
    for (_, _, peft_dir), (_, _, kit_dir) in zip(built[:2], built[2:]):
        peft_merged, kit_merged = (zoo.AutoModelForCausalLM.from_pretrained(d).state_dict() for d in (peft_dir, kit_dir))
        assert peft_merged.keys() == kit_merged.keys()
        assert max(float((peft_merged[k] - kit_merged[k]).abs().max()) for k in peft_merged) < 1e-5
    with pytest.raises(ValueError, match=r"merging.methods.m.mergekit must be one of \('linear', .*\), got 'mean'"):
        quality.Merging(methods={"m": {"mergekit": "mean"}})
    card = json.loads((tmp_path / "lora" / "l-spell" / "card.json").read_text())
    assert card["recipe"]["recipe"]["base"] == base and card["tokenizer"]["kind"] == "base"

    # The merged model adds exactly the mean of the specialists' updates B A * scaling.
    deltas = [adapter_delta(str(tmp_path / "lora" / name), base) for name in ("l-spell", "l-sum")]
    merged = merging.merge_adapters(base, [str(tmp_path / "lora" / n) for n in ("l-spell", "l-sum")], "cat", "mean").state_dict()
    original = zoo.AutoModelForCausalLM.from_pretrained(base).state_dict()
    assert len(deltas[0]) == 7  # q, k, v, o, gate, up, down of the one layer
    for key in deltas[0]:
        assert torch.allclose(merged[key] - original[key], (deltas[0][key] + deltas[1][key]) / 2, atol=1e-6)

    job = quality.Planner(bench, threads=2).test_job("A-merge-mean", built[0][2], {"method": "merge: mean", "pool": "A", "seed": 0})
    result = quality._run_job(job)
    assert result["method"] == "merge: mean"
    # The test path's numbers are the merged model's own, computed apart from Lightning.
    merged_model = zoo.AutoModelForCausalLM.from_pretrained(built[0][2])
    reference = reference_test_metrics(
        merged_model, load_tokenizer(built[0][2]), job["config"]["data"], job["config"]["model"]["max_new_tokens"]
    )
    assert result["acc"] == reference["acc"] and result["sequences"] == reference["sequences"] == {d: 2 for d in DOMAINS}
    assert result["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-5)
    with open(job["result_path"]) as f:
        assert json.load(f)["config_hash"] == job["config_hash"]

    # A later invocation reuses the stored run as it is; a changed config runs again.
    def must_not_run(job):
        raise AssertionError("a stored run with the same config was run again")

    monkeypatch.setattr(quality, "_run_job", must_not_run)
    [reused] = quality._run_all([job], workers=1)
    assert reused["reused"] and reused["acc"] == result["acc"]
    monkeypatch.setattr(quality, "_run_job", lambda job: {"seconds": 0.0, "fresh": True})
    assert quality._run_all([dict(job, config_hash="changed")], workers=1) == [{"seconds": 0.0, "fresh": True}]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "bench.yaml",
        "bench_unlabeled.yaml",
        "bench_on_policy.yaml",
        "bench_unlabeled_srft.yaml",
        "bench_unlabeled_srft_weak.yaml",
        "bench_levers.yaml",
        "bench_unaligned.yaml",
        "bench_unaligned_unlabeled.yaml",
        "bench_pool_c.yaml",
    ],
)
def test_bench_config_train_section_parses(capsys, name):
    """A bench config's `train` section, with a pool and each method, validates against fusion.train
    (an overlay such as bench_on_policy.yaml over bench_unlabeled.yaml's settings, as its command reads it)."""
    from fusion.train import main

    configs = os.path.join(os.path.dirname(__file__), "..", "configs")
    bench = {}
    for part in (
        ["bench_unlabeled.yaml"] if name in ("bench_on_policy.yaml", "bench_unlabeled_srft.yaml", "bench_unlabeled_srft_weak.yaml") else []
    ) + [name]:
        with open(os.path.join(configs, part)) as f:
            bench |= yaml.safe_load(f)
    assert set(bench["pools"]) == {"A", "B"} and set(bench["pools"]["A"]) < set(bench["pools"]["B"])
    for settings in bench["methods"].values():
        config = quality.deep_merge(bench["train"], {"model": {"sources": bench["pools"]["B"], **settings}})
        if "srft" in settings:  # SRFT from another method's adapter: its own stage's settings
            srft = {
                "class_path": "fusion.stages.srft.SRFTModule",
                "init_args": {"student": bench["train"]["model"]["student"], **settings["srft"]["model"]},
            }
            config = {**bench["train"], "model": srft}
        elif "fusion_stage" in settings:  # fusion again from another method's adapter: that method's settings and the stage's
            stage = bench["methods"][settings["after"]] | settings["fusion_stage"].get("model", {})
            config = quality.deep_merge(bench["train"], {"model": {"sources": bench["pools"]["B"], **stage}})
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", yaml.safe_dump(config), "--print_config"])
        assert exit_info.value.code == 0
    srft = "fusion.stages.rewards.checked_or_agreement: 1.0"
    expected = {"bench_pool_c.yaml": "answer_from: fused", "bench_unlabeled_srft.yaml": srft, "bench_unlabeled_srft_weak.yaml": srft}.get(
        name, "unaligned: marginal" if name.startswith("bench_unaligned") else "fusion: oracle"
    )
    assert expected in capsys.readouterr().out


def test_student_seed_does_not_follow_the_sources(monkeypatch, tmp_path):
    """Adding a source to a zoo must not retrain a student whose seed is fixed (else every cache and result changes)."""
    built = {}

    def fake_make_source(job):
        built[job["recipe"]["name"]] = job["seed"]
        return {"name": job["recipe"]["name"], "accuracy": {}, "train_seconds": 0.0}

    monkeypatch.setattr(zoo, "_make_source", fake_make_source)
    student = zoo.SourceRecipe("student", architecture=TINY, seed=99)
    spell = zoo.SourceRecipe("spell", domains=["spell_backward"], architecture=TINY)
    noise = zoo.SourceRecipe("noise", kind="random", architecture=TINY)
    zoo.build_zoo(sources=[spell], student=student, output_dir=str(tmp_path), domains=DOMAINS, seed=10, workers=1)
    first = dict(built)
    zoo.build_zoo(sources=[spell, noise], student=student, output_dir=str(tmp_path), domains=DOMAINS, seed=10, workers=1)
    assert first == {"spell": 10, "student": 99} and built == {"spell": 10, "noise": 11, "student": 99}


def test_label_scarce_criteria():
    """The label-scarce checks on hand-made accuracies of two domains."""
    runs = [
        _run("none", "A", 0, {"d1": 0.3, "d2": 0.3}),
        _run("uniform", "A", 0, {"d1": 0.5, "d2": 0.3}),
        _run("uniform", "B", 0, {"d1": 0.3, "d2": 0.3}),
        _run("confidence", "A", 0, {"d1": 0.6, "d2": 0.4}),
        _run("confidence", "B", 0, {"d1": 0.1, "d2": 0.3}),
        _run("selector", "A", 0, {"d1": 0.7, "d2": 0.42}),
        _run("selector", "B", 0, {"d1": 0.68, "d2": 0.4}),
        _run("oracle", "A", 0, {"d1": 0.7, "d2": 0.45}),
    ]
    methods = {
        name: {"fusion": name, "source_forwards_per_seq": {"A": 1, "B": 1}}
        for name in ("none", "uniform", "confidence", "selector", "oracle")
    }
    for name in ("none", "oracle"):
        runs.append(dict(next(r for r in runs if r["method"] == name), pool="B"))
    summary = report_lib.summarize(runs, methods)
    checks = report_lib.criteria_unlabeled(summary, methods)["selector"]
    assert checks["gain_over_none_at_least_0.08"]["A"]["pass"] and checks["gain_over_none_at_least_0.08"]["B"]["pass"]  # 0.56, 0.54 vs 0.30
    assert checks["within_0.02_of_oracle"]["A"]["pass"]  # 0.56 vs 0.575: 0.015 below
    assert checks["within_0.02_of_oracle"]["A"]["oracle"] == pytest.approx(0.575)
    assert not checks["within_0.02_of_oracle"]["B"]["pass"]  # 0.54: 0.035 below
    assert checks["confidence_plus_0.05"]["B"]["pass"] and set(checks["confidence_plus_0.05"]) == {"B"}  # 0.54 vs 0.20
    # Interference: selector (0.02 + 0.02) / 2 = 0.02; uniform 0.1; confidence (0.5 + 0.1) / 2 = 0.3.
    assert checks["interference_at_most_half"] == {
        "selector": pytest.approx(0.02),
        "uniform": pytest.approx(0.1),
        "confidence": pytest.approx(0.3),
        "pass": True,
    }


def test_on_policy_rows_run_online_and_chains_start_from_their_fusion_run(tmp_path, monkeypatch):
    """On-policy methods never read a cache; a chained row (SRFT, or a second fusion stage) starts
    from its fusion run's saved adapter, per pool and seed, and is checked against its own settings."""
    bench = quality.QualityBench(
        train={"model": {"student": "s"}, "data": {"unlabeled_size": 4}, "trainer": {}},
        pools={"A": ["a"], "B": ["a", "b"]},
        seeds=[0, 1],
        output=str(tmp_path),
        methods={
            "selector k=1": {"fusion": "selector", "top_k": 1},
            "on_policy selector k=1": {"fusion": "selector", "top_k": 1, "response_from": "student"},
            "on_policy srft": {"after": "selector k=1", "srft": {"steps": 5, "model": {"num_generations": 2, "demonstrations": "cache"}}},
            "on_policy after": {
                "after": "selector k=1",
                "fusion_stage": {"steps": 7, "model": {"response_from": "student", "learning_rate": 0.5}},
            },
        },
    )
    monkeypatch.setattr(quality, "_weights", lambda path: "no weights")
    planner = quality.Planner(bench, 1)
    jobs = planner.training_jobs()
    chained = planner.chained_jobs(jobs)
    modes = {(j["record"]["method"], j["record"]["pool"]): j["config"]["model"]["source_mode"] for j in jobs if j["record"]["seed"] == 0}
    assert modes == {
        ("selector k=1", "A"): "cached",
        ("selector k=1", "B"): "cached",
        ("on_policy selector k=1", "A"): "online",
        ("on_policy selector k=1", "B"): "online",
    }
    assert all(j["config"]["model"]["cache_dir"] is None for j in jobs if j["record"]["method"].startswith("on_policy"))
    adapters = {(j["record"]["pool"], j["record"]["seed"]): j["adapter"] for j in jobs if j.get("adapter")}
    assert sorted(adapters) == [("A", 0), ("A", 1), ("B", 0), ("B", 1)]
    srft = [job for job in chained if job["record"]["method"] == "on_policy srft"]
    assert len(srft) == 4
    for job in srft:
        model = job["config"]["model"]
        assert model["class_path"] == "fusion.stages.srft.SRFTModule" and job["config"]["trainer"]["max_steps"] == 5
        assert model["init_args"] == {
            "student": "s",
            "init_from": adapters[(job["record"]["pool"], job["record"]["seed"])],
            "num_generations": 2,
            # the answers the fusion run learned along: its own cache, of its pool
            "demonstrations": jobs[0]["config"]["model"]["cache_dir"].replace("/cache/A", f"/cache/{job['record']['pool']}"),
        }
    stages = {(job["record"]["pool"], job["record"]["seed"]): job for job in chained if job["record"]["method"] == "on_policy after"}
    assert sorted(stages) == sorted(adapters)
    for key, job in stages.items():
        model = job["config"]["model"]
        assert job["config"]["trainer"]["max_steps"] == 7
        assert model == {
            "student": "s",
            "fusion": "selector",
            "top_k": 1,
            "response_from": "student",
            "learning_rate": 0.5,
            "sources": bench.pools[key[0]],
            "source_mode": "online",
            "cache_dir": None,
            "init_from": adapters[key],
        }
    with pytest.raises(
        ValueError, match=r"methods.x: a chained method is \{after: <a fusion method of methods>, srft or fusion_stage: \{steps, model\}\}"
    ):
        quality.QualityBench(train={}, pools={"A": ["a"], "B": ["a", "b"]}, methods={"x": {"after": "nothing", "srft": {"steps": 1}}})
    with pytest.raises(ValueError, match=r"methods.x.fusion_stage: expected \{steps: >= 1"):
        quality.QualityBench(
            train={},
            pools={"A": ["a"], "B": ["a", "b"]},
            methods={"s": {"fusion": "selector"}, "x": {"after": "s", "fusion_stage": {"steps": 0}}},
        )


def test_run_pools_and_the_fused_teacher_are_planned_and_reported(tmp_path, monkeypatch):
    """`run_pools: [B]` trains every method in pool B only (a pool-independent one too, reported
    there); `teacher` plans one job per domain over the named pool A sources and reports the
    teacher beside the best source and each student's share of it."""
    bench = quality.QualityBench(
        train={"model": {"student": "s"}, "data": {"unlabeled_size": 4}, "trainer": {}},
        pools={"A": ["zoo/a1", "zoo/a2", "zoo/b"], "B": ["zoo/a1", "zoo/a2", "zoo/b", "zoo/d"]},
        seeds=[0],
        output=str(tmp_path),
        run_pools=["B"],
        teacher={"da": ["a1", "a2"]},
        methods={"none": {"fusion": "none"}, "selector k=1": {"fusion": "selector", "top_k": 1}},
    )
    monkeypatch.setattr(quality, "_weights", lambda path: "no weights")
    planner = quality.Planner(bench, 1)
    assert sorted((j["record"]["method"], j["record"]["pool"]) for j in planner.training_jobs()) == [("none", "B"), ("selector k=1", "B")]
    (teacher,) = planner.teacher_jobs()
    assert teacher["kind"] == "teacher" and teacher["record"] == {"teacher": "da"}
    assert teacher["config"]["model"]["sources"] == ["zoo/a1", "zoo/a2"] and teacher["config"]["model"]["fusion"] == "none"
    results = {"selector k=1": {"B": {"acc": {"da": 0.6}, "acc_std": {"da": 0.02}}}}
    report = report_lib.fused_teachers(
        bench.teacher, {"da": {"acc": 0.8, "source_forwards_per_token": 2}}, {"A": {"da": ("a1", 0.5)}}, results
    )
    assert report["da"]["ratio_to_best_source"] == pytest.approx(1.6)
    assert report["da"]["students"]["selector k=1"]["B"]["of_teacher"] == pytest.approx(0.75)
    table = "\n".join(report_lib.teacher_table(report))
    assert "| da | 0.800 | a1 + a2 | a1 0.500 | 1.60 |" in table and "| selector k=1 | B | da | 0.600 ± 0.020 | 1.20 | 0.75 |" in table
    with pytest.raises(ValueError, match=r"run_pools must list A, B or both, once each, got \['C'\]"):
        quality.QualityBench(train={}, pools={"A": ["a"], "B": ["a", "b"]}, methods={}, run_pools=["C"])
    with pytest.raises(ValueError, match=r"teacher.da must name sources of pools.A \['a'\], got \['b'\]"):
        quality.QualityBench(train={}, pools={"A": ["a"], "B": ["a", "b"]}, methods={}, teacher={"da": ["b"]})


def test_on_policy_criteria_and_sampled_tokens(tmp_path):
    """On-policy selector: at least the off-policy selector with its top_k (and that run continued
    off-policy, for a stage after it), within 0.02 of the on-policy oracle; the report reads the
    tokens sampled per step from the run's log."""
    runs = [
        _run("selector k=1", "A", 0, {"d1": 0.5, "d2": 0.3}),
        _run("selector k=1", "B", 0, {"d1": 0.5, "d2": 0.3}),
        _run("oracle", "A", 0, {"d1": 0.9, "d2": 0.9}),
        _run("on_policy selector k=1", "A", 0, {"d1": 0.6, "d2": 0.3}),
        _run("on_policy selector k=1", "B", 0, {"d1": 0.4, "d2": 0.3}),
        _run("on_policy oracle", "A", 0, {"d1": 0.6, "d2": 0.32}),
        _run("on_policy oracle", "B", 0, {"d1": 0.6, "d2": 0.32}),
        _run("selector k=1 continued", "A", 0, {"d1": 0.5, "d2": 0.5}),
        _run("selector k=1 continued", "B", 0, {"d1": 0.3, "d2": 0.3}),
    ]
    (tmp_path / "metrics.csv").write_text("step,train/loss,train/sampled_tokens\n9,1.0,300\n19,0.9,\n19,,\n29,0.8,500\n")
    runs[3]["log_dir"] = str(tmp_path)
    methods = {
        "selector k=1": {"fusion": "selector", "top_k": 1},
        "oracle": {"fusion": "oracle"},
        "on_policy selector k=1": {
            "fusion": "selector",
            "top_k": 1,
            "response_from": "student",
            "after": "selector k=1",
            "fusion_stage": {"steps": 2},
        },
        "on_policy oracle": {"fusion": "oracle", "response_from": "student"},
        "selector k=1 continued": {"fusion": "selector", "top_k": 1, "after": "selector k=1", "fusion_stage": {"steps": 2}},
    }
    methods = {name: m | {"source_forwards_per_seq": {"A": 1, "B": 1}} for name, m in methods.items()}
    summary = report_lib.summarize(runs, methods)
    assert summary["on_policy selector k=1"]["A"]["sampled_tokens_per_step"] == pytest.approx((300 + 0 + 500) / 3)
    assert "sampled_tokens_per_step" not in summary["selector k=1"]["A"]
    checks = report_lib.criteria_unlabeled(summary, methods)
    assert set(checks) == {"selector k=1", "selector k=1 continued", "on_policy selector k=1"}
    assert checks["selector k=1"]["within_0.02_of_oracle"]["A"]["oracle"] == pytest.approx(0.9)  # the off-policy oracle
    on = checks["on_policy selector k=1"]
    assert (
        on["at_least_off_policy_selector"]["A"]["pass"] and not on["at_least_off_policy_selector"]["B"]["pass"]
    )  # 0.45 >= 0.4; 0.35 < 0.4
    assert on["within_0.02_of_on_policy_oracle"]["A"]["pass"] and not on["within_0.02_of_on_policy_oracle"]["B"]["pass"]  # 0.45 vs 0.46
    # A stage after "selector k=1" also faces that run continued off-policy: 0.45 < 0.5 in A, 0.35 >= 0.3 in B.
    assert [on["at_least_off_policy_continued"][pool]["pass"] for pool in ("A", "B")] == [False, True]
    assert on["at_least_off_policy_continued"]["A"]["selector k=1 continued"] == pytest.approx(0.5)
    report = {"quick": True, "seeds": [0], "results": summary, "criteria": checks, "runtime_seconds": 1.0}
    assert "| sampled tokens / step |" in report_lib.markdown(report, "") and "| 267 |" in report_lib.markdown(report, "")


def test_the_answers_to_prompts_without_gold_are_scored_against_the_generators_gold():
    """The suite draws the prompts without gold again with their answers: the same prompts, in the
    same order, as the data module gives the run; a right and a wrong answer score 1 and 0. The
    answers table prints the shares and the forwards each way of answering costs."""
    from fusion.data.datamodule import FusionDataModule
    from fusion.sources.cache import row_key
    from fusion.stages.evaluation import correct

    data = {"dataset": "suite", "domains": ["spell_backward", "word_sorting"], "train_size": 4, "val_size": 2, "test_size": 3}
    data["unlabeled_size"] = {"spell_backward": 3, "word_sorting": 5}
    gold = quality._suite_gold(json.dumps(data, sort_keys=True))
    unlabeled = FusionDataModule(**data).load()["unlabeled"]
    assert [row_key(row) for row in unlabeled] == list(gold) and len(gold) == 8
    row = gold[row_key(unlabeled[0])]
    assert correct([row["response"], row["response"] + "x"], [row, row]) == [True, False]
    assert quality._suite_gold(json.dumps({**data, "unlabeled_size": 0}, sort_keys=True)) is None
    summary = {
        "top": {"B": {"answer_accuracy": {"d": 0.5}, "generations_per_prompt": 1.0, "source_forwards_per_seq": 3}},
        "fused": {
            "B": {"answer_accuracy": {"d": 0.75}, "generations_per_prompt": 2.5, "source_forwards_per_seq": 3, "answer_from": "fused"}
        },
    }
    table = "\n".join(report_lib.answers_table(summary))
    assert "| top | B | 0.500 | 1.00 | 1 | 3 |" in table and "| fused | B | 0.750 | 2.50 | 2.50 (whole text) | 3 |" in table
