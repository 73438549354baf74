"""Every command README.md and docs/guides/ name, run end to end on the tiny zoo.

Each test calls the command's `main(argv)` in this process, as `python -m ...` would (the
benchmarks through `fusion.bench`'s dispatcher), with configs derived from the repository's
own, shrunk to the tiny zoo, a few steps and a few rows, and checks the numbers it wrote.
Commands with an end-to-end test elsewhere are not repeated here: `fusion.train fit` and
`test` (test_cli.py), `predict` (test_cache.py, test_unlabeled.py), `fusion.eval_harness`
(test_eval_harness.py) and `fusion.demo` (test_zoo.py).
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from fusion.bench.__main__ import main as bench
from tests.conftest import DOMAINS, tiny_config, tiny_zoo_recipe

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
SOURCES = ("spell", "sum", "noise")


def _load(name: str) -> dict:
    with open(os.path.join(CONFIGS, name)) as f:
        return yaml.safe_load(f)


def _write(path, settings: dict) -> str:
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return str(path)


def _read_json(path) -> dict:
    with open(path) as f:
        return json.load(f)


def report_line(origin: dict) -> str:
    """The line a bench's report.md opens with, after its title."""
    return f"`{origin['command']}` at commit `{origin['commit']}`, on {origin['machine']}."


def _fraction(value: float) -> bool:
    return 0.0 <= value <= 1.0


@pytest.fixture(autouse=True)
def torch_threads():
    """One torch thread, where a command does not set its own: the tiny models run fastest on one
    (more spin against each other on a busy machine). The next test gets the count back."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def bench_config(tiny_zoo, tmp_path) -> str:
    """configs/bench_unlabeled.yaml on the tiny zoo: pool A the two specialists, B with the random
    source added; two methods (none, the likelihood selector); 8 gold answers and 8 prompts
    without one per domain, 4 rows per split; the quick settings a single seed and 2 steps."""
    bench = _load("bench_unlabeled.yaml")
    paths = {name: os.path.join(tiny_zoo, name) for name in SOURCES}
    bench.update(
        output=str(tmp_path / "quality"),
        seeds=[0, 1, 2],
        steps=50,
        workers=1,
        threads=1,
        pools={"A": [paths["spell"], paths["sum"]], "B": [paths[n] for n in SOURCES]},
        methods={"none": bench["methods"]["none"], "selector k=1": bench["methods"]["selector k=1"]},
    )
    train = bench["train"]
    train["trainer"]["val_check_interval"] = 2
    train["model"].update(
        student=os.path.join(tiny_zoo, "student"),
        oracle={"spell_backward": "spell", "chain_sum": "sum"},
        lora={**train["model"]["lora"], "r": 4},
        exploration_steps=2,
        selector_prefit_steps=10,
        response_max_new_tokens=6,
        max_new_tokens=6,
    )
    train["data"].update(domains=DOMAINS, train_size=8, unlabeled_size={d: 8 for d in DOMAINS}, val_size=4, test_size=4, batch_size=8)
    bench["quick_settings"] = {
        "output": str(tmp_path / "quality-quick"),
        "seeds": [0],
        "steps": 2,
        "train": {"trainer": {"val_check_interval": 2}, "data": {"test_size": 2, "unlabeled_size": 4}},
    }
    return _write(tmp_path / "bench.yaml", bench)


def test_bench_without_a_name_lists_the_benchmarks():
    """`python -m fusion.bench`: the usage line names every benchmark module."""
    with pytest.raises(SystemExit) as exit_info:
        bench([])
    assert (
        str(exit_info.value)
        == "usage: python -m fusion.bench {alignment,lookahead,memory,quality,ray_cache,selector,srft,target,teacher,throughput} [options]"
    )


@pytest.mark.slow
def test_zoo_builds_a_changed_source_and_reuses_the_others(tiny_zoo, tmp_path, capsys):
    """`python -m fusion.zoo --config <zoo.yaml>`: the tiny zoo's recipe in configs/zoo.yaml's form,
    its last source replaced by zoo.yaml's first (shrunk to the tiny architecture and 3 steps; in
    the same place, so every other model keeps its seed): that one is built, the rest reused."""
    from dataclasses import asdict

    from fusion import zoo

    root = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, root)
    weights = {name: os.stat(root / name / "model.safetensors").st_mtime_ns for name in os.listdir(root)}
    recipe = tiny_zoo_recipe(str(root))
    config = {key: value for key, value in _load("zoo.yaml").items() if key not in ("seed", "student", "sources")}
    config.update({k: v for k, v in recipe.items() if k not in ("sources", "student")}, workers=1)

    def as_dict(source) -> dict:
        return {k: v for k, v in asdict(source).items() if v is not None}

    replaced = dict(_load("zoo.yaml")["sources"][0], name="spell-2", steps=3, architecture=as_dict(recipe["student"].architecture))
    config.update(student=as_dict(recipe["student"]), sources=[as_dict(s) for s in recipe["sources"][:2]] + [replaced])
    zoo.main(["--config", _write(tmp_path / "zoo.yaml", config)])

    assert "zoo: building 1 of 4 models" in capsys.readouterr().out
    assert {name: os.stat(root / name / "model.safetensors").st_mtime_ns for name in weights} == weights
    card = _read_json(root / "spell-2" / "card.json")
    assert (
        card["name"] == "spell-2" and card["recipe"]["recipe"]["steps"] == 3 and card["recipe"]["recipe"]["domains"] == ["spell_backward"]
    )
    assert set(card["accuracy"]) <= set(DOMAINS) and all(_fraction(a) for a in card["accuracy"].values())
    assert os.path.getsize(root / "spell-2" / "model.safetensors") > 0
    assert sorted(os.listdir(root)) == sorted([*weights, "spell-2"])


@pytest.mark.slow
def test_export_writes_a_plain_model_with_the_adapter_merged(write_config, tiny_zoo, tmp_path, capsys):
    """`python -m fusion.export --ckpt_path ... --output_dir ...` on a 1-step fit's last.ckpt."""
    import torch
    from transformers import AutoModelForCausalLM

    from fusion import export
    from fusion.train import main

    main(["fit", "--config", write_config(fusion="none"), "--trainer.max_steps=1", "--trainer.limit_val_batches=0"])
    ckpt = str(tmp_path / "runs" / "run" / "version_0" / "checkpoints" / "last.ckpt")
    out = str(tmp_path / "exported")
    capsys.readouterr()
    export.main(["--ckpt_path", ckpt, "--output_dir", out])

    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == out and f"tokenizer={os.path.join(out, 'tokenizer')}" in printed[1]
    assert os.path.isfile(os.path.join(out, "model.safetensors")) and os.path.isfile(os.path.join(out, "tokenizer", "tokenizer.json"))
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    base = AutoModelForCausalLM.from_pretrained(os.path.join(tiny_zoo, "student")).state_dict()
    assert {k: v.shape for k, v in merged.items()} == {k: v.shape for k, v in base.items()}
    changed = [k for k in base if not torch.equal(merged[k], base[k])]
    assert len(changed) == 7  # q, k, v, o, gate, up, down of the one layer: the adapter's update, merged


@pytest.mark.slow
def test_bench_quality_quick(bench_config, tmp_path, monkeypatch):
    """`python -m fusion.bench quality --config <bench> --quick`: the caches, every run, the sources'
    own answers and the report, for one seed and two steps."""
    monkeypatch.setattr(sys, "argv", ["fusion.bench"])  # the bench resets sys.argv
    bench(["quality", "--config", bench_config, "--quick"])

    output = tmp_path / "quality-quick"
    report = _read_json(output / "report.json")
    assert report["quick"] and report["seeds"] == [0] and report["steps"] == 2
    # Fits: none once (it runs no source), the selector per pool; tests: the untrained base.
    assert report["runs"] == 4 and report["runs_reused"] == 0
    assert sorted(report["run_seconds"]) == [
        "A/none/seed0",
        "A/selector k=1/seed0",
        "A/student base (no training)/seed0",
        "B/selector k=1/seed0",
    ]
    assert set(report["sources"]) == set(SOURCES)
    assert all(_fraction(acc) for source in report["sources"].values() for acc in source.values())
    for method in ("none", "selector k=1", "student base (no training)"):
        for pool in ("A", "B"):
            row = report["results"][method][pool]
            assert set(row["acc"]) == set(DOMAINS) and all(_fraction(a) for a in row["acc"].values())
            assert _fraction(row["acc_mean"])
    assert report["results"]["selector k=1"]["B"]["source_forwards_per_seq"] == 1
    markdown = (output / "report.md").read_text()
    assert "| selector k=1 | B |" in markdown
    assert all((output / name).is_file() for name in ("accuracy.png", "report.md"))


def test_bench_quality_pool_c_quick(tiny_zoo, tmp_path, monkeypatch):
    """configs/bench_pool_c.yaml on the tiny zoo, quick: the methods train in pool B only, the
    fused-answers selector writes its answers with its weighed sources together, the report scores
    those answers against the suite's gold, the fused teacher decodes chain_sum, and SRFT starts
    from the fused run reading its cache's answers."""
    config = _load("bench_pool_c.yaml")
    paths = {name: os.path.join(tiny_zoo, name) for name in SOURCES}
    fused = config["methods"]["selector k<=3, fused answers"] | {"top_k": 2}
    srft = config["methods"]["srft after fused answers"]
    srft["srft"]["model"] |= {"num_generations": 2, "max_new_tokens": 6}  # its adapter: the train config's (the fused run's)
    config.update(
        output=str(tmp_path / "pool_c"),
        seeds=[0],
        steps=2,
        workers=1,
        pools={"A": [paths["spell"], paths["sum"]], "B": [paths[n] for n in SOURCES]},
        teacher={"chain_sum": ["sum", "spell"]},
        methods={"fused": fused, "srft after fused answers": srft | {"after": "fused"}},
        quick_settings={},
    )
    srft["srft"]["steps"] = 1
    train = config["train"]
    train["trainer"]["val_check_interval"] = 2
    train["model"].update(student=os.path.join(tiny_zoo, "student"), lora={**train["model"]["lora"], "r": 4})
    train["model"].update(selector_prefit_steps=10, response_max_new_tokens=6, max_new_tokens=6, exploration_steps=2)
    train["data"].update(domains=DOMAINS, train_size=8, unlabeled_size={d: 4 for d in DOMAINS}, val_size=4, test_size=4, batch_size=8)
    monkeypatch.setattr(sys, "argv", ["fusion.bench"])
    bench(["quality", "--config", _write(tmp_path / "bench.yaml", config)])
    report = _read_json(tmp_path / "pool_c" / "report.json")
    assert sorted(report["run_seconds"]) == ["A/student base (no training)/seed0", "B/fused/seed0", "B/srft after fused answers/seed0"]
    fused_row = report["results"]["fused"]["B"]
    assert set(fused_row["answer_accuracy"]) == set(DOMAINS) and all(_fraction(v) for v in fused_row["answer_accuracy"].values())
    assert fused_row["answer_from"] == "fused" and 1.0 <= fused_row["generations_per_prompt"] <= 2.0
    teacher = report["fused_teacher"]["chain_sum"]
    assert teacher["sources"] == ["sum", "spell"] and _fraction(teacher["acc"]) and teacher["source_forwards_per_token"] == 2
    markdown = (tmp_path / "pool_c" / "report.md").read_text()
    assert "## The answers the student learns along" in markdown and "## Against the fused teacher" in markdown


@pytest.mark.slow
def test_bench_lookahead(bench_config, tmp_path):
    """`python -m fusion.bench lookahead --config <bench>` on 4 labelled rows, 2 changes each: the
    source with the student's tokenizer reads only the text before the changed token (TV 0)."""
    bench(["lookahead", "--config", bench_config, "--rows", "4", "--per_row", "2", "--output", str(tmp_path / "lookahead")])

    report = _read_json(tmp_path / "lookahead" / "report.json")
    assert report["rows"] == 4 and report["per_row"] == 2 and set(report["results"]) == {"spell", "sum"}
    for name, boundaries in report["results"].items():
        assert set(boundaries) == {"token_end", "prefix"}
        for row in boundaries.values():
            assert 0 < row["positions"] <= 8
            assert _fraction(row["mean_tv"]) and _fraction(row["share_above_0.05"]) and _fraction(row["share_split_differs"])
    assert report["results"]["spell"]["token_end"]["mean_tv"] == 0.0 == report["results"]["spell"]["prefix"]["mean_tv"]


@pytest.mark.slow
def test_bench_target(bench_config, tmp_path):
    """`python -m fusion.bench target --config <bench> --pool B` on 4 labelled rows: every pair of
    the three sources, the cached target's misplaced mass and its KL from the exact one."""
    bench(["target", "--config", bench_config, "--pool", "B", "--rows", "4", "--output", str(tmp_path / "target")])

    report = _read_json(tmp_path / "target" / "report.json")
    assert report["pool"] == "B" and sorted(report["results"]) == ["spell + noise", "spell + sum", "sum + noise"]
    assert report["provenance"]["command"].startswith("python -m fusion.bench target --config ")
    assert (tmp_path / "target" / "report.md").read_text().count("\n| spell + ") == 2  # the page: one row per pair
    for pair in report["results"].values():
        assert pair["positions"] > 0
        mass, kl = pair["misplaced_mass"], pair["kl_exact_to_cached"]
        assert -1e-6 <= mass["mean"] <= mass["p95"] + 1e-6 <= mass["max"] + 2e-6 <= 1 + 2e-6
        assert -1e-5 <= kl["mean"] <= kl["max"] + 1e-6 and math.isfinite(kl["max"])


@pytest.mark.slow
def test_bench_selector(bench_config, tmp_path):
    """`python -m fusion.bench selector --config <bench>`: both pools, both selector losses at two
    feedback weights, one seed."""
    bench(
        ["selector", "--config", bench_config, "--feedback_weights", "[0.0, 1.0]", "--seeds", "[0]", "--output", str(tmp_path / "selector")]
    )

    report = _read_json(tmp_path / "selector" / "report.json")
    assert report["seeds"] == [0] and set(report["pools"]) == {"A", "B"}
    assert report["provenance"]["command"].startswith("python -m fusion.bench selector --config ")  # the page names its command
    for pool, entry in report["pools"].items():
        assert entry["sources"] == list(SOURCES[: 2 if pool == "A" else 3])
        assert entry["labelled_rows"] == 8 * len(DOMAINS) and entry["unlabeled_prompts"] == 8 * len(DOMAINS)
        assert sorted(entry["feedback_weights"]) == ["likelihood 0.0", "likelihood 1.0", "mse 0.0", "mse 1.0"]
        for row in entry["feedback_weights"].values():
            assert len(row["runs"]) == 1 and _fraction(row["routed_to_specialist"]) and _fraction(row["routed_to_distractor"])
            assert set(row["routed_to_specialist_by_domain"]) == set(DOMAINS)
            assert math.isfinite(row["bias_specialists"])
            assert (row["routed_to_distractor"] == 0.0) if pool == "A" else ("bias_distractors" in row)
    assert "| B | likelihood 1.0 |" in (tmp_path / "selector" / "report.md").read_text()


@pytest.mark.slow
def test_bench_srft_quick(tiny_zoo, tmp_path):
    """`python -m fusion.bench srft --quick`: configs/srft.yaml from the tiny zoo's spell_backward
    specialist (a student that knows a little), 2 prompts x 2 rollouts per step, each variant 20
    steps, evaluated at steps 0, 10, 20; the fusion control continues the tiny zoo's fusion stage
    from the same start and samples nothing."""
    config = _load("srft.yaml")
    init = config["model"]["init_args"]
    init.update(student=os.path.join(tiny_zoo, "spell"), init_from=None, num_generations=2, max_new_tokens=6)
    config["data"].update(domains=DOMAINS, train_size=8, val_size=2, test_size=2, batch_size=2)
    fusion = tiny_config(tiny_zoo, str(tmp_path / "runs"), student=os.path.join(tiny_zoo, "spell"), lora=init["lora"])
    output = tmp_path / "srft"
    arguments = ["--config", _write(tmp_path / "srft.yaml", config), "--quick", "--output", str(output)]
    bench(["srft", *arguments, "--fusion_config", _write(tmp_path / "fusion.yaml", fusion)])

    report = _read_json(output / "report.json")
    assert report["settings"]["steps"] == 20 and report["settings"]["seeds"] == [0] and report["settings"]["eval_size"] == 25
    assert [r["variant"] for r in report["runs"]] == ["srft", "sft_only", "rl_only", "sft_then_rl", "fusion_continued"]
    control = report["runs"].pop()
    assert [p["step"] for p in control["points"]] == [0, 10, 20] and control["entropy"] == [] and control["generated_tokens"] == 0
    assert control["points"][0] == report["runs"][0]["points"][0]  # the same start, evaluated the same way
    assert report["summary"]["fusion_continued"]["final_entropy"] is None
    assert "| fusion_continued |" in (output / "report.md").read_text()
    for run in report["runs"]:
        assert [p["step"] for p in run["points"]] == [0, 10, 20]
        assert len(run["entropy"]) == 20 and all(e >= 0 for e in run["entropy"])
        assert run["generated_tokens"] > 0
        for point in run["points"]:
            assert set(point["acc_id"]) == set(point["acc_ood"]) == set(DOMAINS)
            assert all(_fraction(point[k]) for k in ("acc_id_mean", "acc_ood_mean", "score_id_mean", "score_ood_mean"))
    assert report["runs"][0]["points"][0]["score_id_mean"] > 0  # the specialist's partial credit: the evaluation reads the model
    assert set(report["summary"]) == {"srft", "sft_only", "rl_only", "sft_then_rl", "fusion_continued"}
    assert (
        report["provenance"]["command"] == f"python -m fusion.bench srft {' '.join(arguments)} --fusion_config {tmp_path / 'fusion.yaml'}"
    )
    assert (output / "report.md").read_text().split("\n")[2] == report_line(report["provenance"])
    assert all((output / f"{name}.png").is_file() for name in ("accuracy_id", "accuracy_ood", "score_ood", "entropy"))


@pytest.mark.slow
def test_bench_alignment(tiny_zoo, tmp_path):
    """`python -m fusion.bench alignment --zoo <zoo>` on 2 rows per domain: coverage and gold
    agreement per source and policy, and the top-10 mass of the zoo's sources with other tokenizers."""
    output = tmp_path / "alignment"
    bench(["alignment", "--train_size", "2", "--batch_size", "8", "--bpe_vocab_size", "300", "--zoo", tiny_zoo, "--output", str(output)])

    from fusion.data import tasks
    from fusion.sources.pool import UNALIGNED_POLICIES

    report = _read_json(output / "report.json")
    assert report["student"] == "char" and report["rows"] == 2 * len(tasks.DEFAULT_DOMAINS)
    assert sorted(report["sources"]) == ["bpe300", "bpe300-digits", "gpt2"] and list(report["coarser"]) == ["char"]
    for policies in [*report["sources"].values(), *report["coarser"].values()]:
        assert set(policies) == set(UNALIGNED_POLICIES)
        for row in policies.values():
            assert _fraction(row["coverage"]) and _fraction(row["gold_agreement"]) and row["tokens_per_second"] > 0
            assert set(row["domains"]) == set(tasks.DEFAULT_DOMAINS)
    # Sources that know the text agree with gold wherever they give a distribution.
    assert all(row["gold_agreement"] == pytest.approx(row["coverage"]) for row in report["sources"]["gpt2"].values())
    assert sorted(report["top_k_mass"]) == ["noise", "sum"]  # the zoo's sources with another tokenizer than the student's
    for row in report["top_k_mass"].values():
        assert 0.0 <= row["boundary_top"] <= row["boundary_whole"] + 1e-5 <= 1 + 1e-4
    page = (output / "report.md").read_text()  # what it printed, after its command, commit and machine
    assert page.split("\n")[2].startswith("`python -m fusion.bench alignment --train_size 2 --batch_size 8 ") and " at commit `" in page
    assert "vocabulary maps source -> student" in page and "student vocabulary  151936:" in page


@pytest.mark.slow
def test_bench_memory(tmp_path, monkeypatch):
    """`python -m fusion.bench memory --vocab 64 --batch_size 2`. The bench runs each of its four
    measurements in a fresh interpreter (`python -m fusion.bench memory --child ...`, about 12 s of
    imports each); here `subprocess.run` runs that child command in this process, after handing the
    free heap pages back to the system, so the whole command runs but the MiB are this process's,
    not a fresh one's: only their shape and sign are checked. Git, for the report's commit, runs."""
    from fusion.bench import memory

    run = subprocess.run

    def in_process(command, env=None, **kwargs):
        if command[0] == "git":  # the report's commit
            return run(command, env=env, **kwargs)
        assert command[:4] == [sys.executable, "-m", "fusion.bench", "memory"] and env["MALLOC_MMAP_THRESHOLD_"] == "65536"
        argv = command[4:]
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # free heap pages back to the system, as a fresh process has none
        with pytest.MonkeyPatch.context() as patch:
            printed = []
            patch.setattr("builtins.print", lambda *args, **kwargs: printed.append(" ".join(map(str, args))))
            memory.main(argv)
        return subprocess.CompletedProcess(command, 0, stdout="\n".join(printed) + "\n", stderr="")

    monkeypatch.setattr(memory.subprocess, "run", in_process)
    bench(["memory", "--vocab", "64", "--batch_size", "2", "--output", str(tmp_path / "memory")])

    report = _read_json(tmp_path / "memory" / "report.json")
    assert report["provenance"]["command"] == f"python -m fusion.bench memory --vocab 64 --batch_size 2 --output {tmp_path / 'memory'}"
    page = (tmp_path / "memory" / "report.md").read_text()
    assert page.split("\n")[2] == report_line(report["provenance"]) and "\n| 64 | " in page
    assert report["batch_size"] == 2 and list(report["mib"]) == ["64"]
    assert list(report["mib"]["64"]) == list(memory.METHODS)
    assert all(math.isfinite(mib) and mib > 0 for mib in report["mib"]["64"].values())


@pytest.mark.slow
def test_bench_throughput(tmp_path):
    """`python -m fusion.bench throughput` with a 64-token vocabulary, 16-wide one-layer models,
    batches of 2 and 1 timed step."""
    from fusion.bench.throughput import METHODS

    output = tmp_path / "throughput"
    bench(
        [
            "throughput",
            "--vocab",
            "64",
            "--steps",
            "1",
            "--batch_size",
            "2",
            "--hidden_size",
            "16",
            "--layers",
            "1",
            "--output",
            str(output),
        ]
    )

    report = _read_json(output / "report.json")
    page = (output / "report.md").read_text()
    assert page.split("\n")[2] == report_line(report["provenance"]) and "\n| selector-online | " in page
    assert (report["vocab"], report["steps"], report["batch_size"], report["hidden_size"], report["layers"]) == (64, 1, 2, 16, 1)
    assert list(report["seconds_per_step"]) == list(METHODS) and all(s > 0 for s in report["seconds_per_step"].values())
    assert report["ratio_to_sft"]["sft"] == 1.0 and report["source_forward_seconds"] > 0
    assert report["ideal_ratio"]["selector-cached"] == 1.0
    assert 0 < report["ideal_ratio"]["avgce-online"] < report["ideal_ratio"]["selector-online"] < 1
    assert set(report["source_cost_over_forward"]) == {"selector-online", "avgce-online"}


def test_bench_teacher(tiny_zoo, tmp_path):
    """`python -m fusion.bench teacher` on 6 spell_backward prompts: a source with the student's
    tokenizer decoded per student token answers exactly as its own greedy decoding does, and the
    pair's fused accuracy is reported against the better source alone."""
    import os

    output = tmp_path / "teacher"
    sources = [os.path.join(tiny_zoo, name) for name in ("spell", "sum")]
    bench(
        [
            "teacher",
            "--domain",
            "spell_backward",
            "--sources",
            *sources,
            "--student",
            os.path.join(tiny_zoo, "student"),
            "--test_size",
            "6",
            "--max_new_tokens",
            "12",
            "--output",
            str(output),
        ]
    )

    report = _read_json(output / "report.json")
    spell = report["sources"]["spell"]
    assert spell["read_by_student_token"] == spell["own"]  # the student's own tokenizer: read exactly
    ((names, pair),) = report["fused"].items()
    assert names == "spell + sum" and pair["source_forwards_per_token"] == 2 and 0.0 <= pair["accuracy"] <= 1.0
    best = max(s["own"] for s in report["sources"].values())
    assert pair["ratio_to_best_source"] == (pytest.approx(pair["accuracy"] / best) if best > 0 else None)
    assert report["provenance"]["command"].startswith("python -m fusion.bench teacher --domain spell_backward")
    assert "| spell + sum |" in (output / "report.md").read_text()
