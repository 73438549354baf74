"""The quality benchmark's report: aggregation over seeds, knowledge interference, the criteria,
the Markdown table and the plots. Pure functions of the runs' test metrics (no training here).

A run is a dict: method, pool, seed, acc ({domain: accuracy}), acc_mean, and for the selector
selection_by_domain ({domain: {source: share}}) and log_dir (its CSV logs).
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import os
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterator

from fusion.utils.io import atomic_open, atomic_write_json, atomic_write_text

SPECIALISTS, DISTRACTED = "A", "B"


def std(values: list[float]) -> float:
    """Sample standard deviation over seeds (0 for a single seed)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def interference(acc_a: dict[str, float], acc_b: dict[str, float]) -> float:
    """Knowledge interference: the mean over domains of max(0, acc_A(d) - acc_B(d)), the accuracy
    that adding the distractors (pool B) costs against the specialists alone (pool A)."""
    return sum(max(0.0, acc_a[d] - acc_b[d]) for d in acc_a) / len(acc_a)


def specialist_gap(acc_oracle: dict[str, float], acc: dict[str, float]) -> float:
    """The mean over domains of max(0, acc_oracle(d) - acc(d)): the accuracy lost against distilling
    each domain from its own specialist alone, i.e. to every other source in the pool (the other
    domains' specialists as well as the distractors). Interference measures only what pool B adds."""
    return sum(max(0.0, acc_oracle[d] - acc[d]) for d in acc_oracle) / len(acc_oracle)


def summarize(runs: list[dict], methods: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """Per method and pool: accuracy per domain (mean and std over seeds), the mean accuracy with
    its std over seeds, interference (pool A vs pool B, from the seed-mean accuracies; and per
    seed, paired, as mean and std) and the source forwards per training sequence.

    methods: name -> {"source_forwards_per_seq": {pool: n}, ...} (anything else is copied).
    """
    grouped: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for run in sorted(runs, key=lambda r: r["seed"]):
        grouped[run["method"]][run["pool"]].append(run)
    summary: dict[str, dict[str, dict]] = {}
    for method in methods:
        pools = grouped.get(method, {})
        entry: dict[str, dict] = {}
        for pool, group in pools.items():
            domains = sorted(group[0]["acc"])
            entry[pool] = {
                "acc": {d: statistics.fmean(r["acc"][d] for r in group) for d in domains},
                "acc_std": {d: std([r["acc"][d] for r in group]) for d in domains},
                "acc_mean": statistics.fmean(r["acc_mean"] for r in group),
                "acc_mean_std": std([r["acc_mean"] for r in group]),
                "acc_mean_per_seed": {str(r["seed"]): r["acc_mean"] for r in group},
                "seeds": [r["seed"] for r in group],
                "source_forwards_per_seq": methods[method]["source_forwards_per_seq"][pool],
            }
            if all("seconds" in r for r in group):
                entry[pool]["seconds_mean"] = statistics.fmean(r["seconds"] for r in group)
            sampled = [sampled_tokens_per_step(r.get("log_dir") or "") for r in group]
            if all(v is not None for v in sampled):
                entry[pool]["sampled_tokens_per_step"] = statistics.fmean(sampled)
            for key in (
                "generations_per_prompt",
                "answers",
                "answer_accuracy",
                "cache_seconds",
            ):  # the costs of answering prompts without gold
                if pool in methods[method].get(key, {}):
                    entry[pool][key] = methods[method][key][pool]
            if methods[method].get("answer_from"):
                entry[pool]["answer_from"] = methods[method]["answer_from"]
            biases = [selector_bias(r.get("log_dir") or "") for r in group]
            if all(biases):
                entry[pool]["selector_bias"] = {name: statistics.fmean(b[name] for b in biases) for name in biases[0]}
            if "selection_by_domain" in group[0]:
                entry[pool]["selection_by_domain"] = {
                    d: {s: statistics.fmean(r["selection_by_domain"][d][s] for r in group) for s in shares}
                    for d, shares in group[0]["selection_by_domain"].items()
                }
            for key in ("shared_with", "note"):
                if key in methods[method]:
                    entry[pool][key] = methods[method][key]
        if SPECIALISTS in entry and DISTRACTED in entry:
            a, b = entry[SPECIALISTS], entry[DISTRACTED]
            paired = {str(r["seed"]): r for r in pools[SPECIALISTS]}
            per_seed = [interference(paired[str(r["seed"])]["acc"], r["acc"]) for r in pools[DISTRACTED] if str(r["seed"]) in paired]
            value = {
                "interference": interference(a["acc"], b["acc"]),
                "interference_per_seed_mean": statistics.fmean(per_seed) if per_seed else None,
                "interference_per_seed_std": std(per_seed) if per_seed else None,
            }
            a.update(value)
            b.update(value)
        summary[method] = entry
    oracle = next((name for name, m in methods.items() if m.get("fusion") == "oracle" and not on_policy(m)), None)
    if oracle in grouped:
        reference = {str(r["seed"]): r["acc"] for r in grouped[oracle][SPECIALISTS]}
        for method, entry in summary.items():
            if methods[method].get("fusion") in (None, "none", "oracle"):  # no sources at training, or the reference
                continue
            for pool, result in entry.items():
                paired = [specialist_gap(reference[str(r["seed"])], r["acc"]) for r in grouped[method][pool] if str(r["seed"]) in reference]
                result["specialist_gap"] = specialist_gap(summary[oracle][SPECIALISTS]["acc"], result["acc"])
                result["specialist_gap_per_seed_mean"] = statistics.fmean(paired) if paired else None
                result["specialist_gap_per_seed_std"] = std(paired) if paired else None
    return summary


def provenance(arguments: list[str], prog: str = "python -m fusion.bench quality") -> dict[str, str]:
    """What a results page names: the command (`prog` and its `arguments`), the commit (with
    "+changes" when the work tree differs from it) and the machine."""
    import platform
    import subprocess

    import torch

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "+changes"
    return {
        "command": " ".join([prog, *(a for a in arguments if a != "--report_only")]),
        "commit": commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}",
    }


def provenance_line(origin: dict[str, str]) -> str:
    """The sentence a report opens with: its command, commit and machine (see `provenance`)."""
    return f"`{origin['command']}` at commit `{origin['commit']}`, on {origin['machine']}."


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


@contextlib.contextmanager
def printed_report(prog: str, arguments: list[str], title: str) -> Iterator[dict]:
    """The report.md of a bench that prints its tables. Yields {"provenance": ...} (taken before
    the block runs); the block sets "output", a directory. Everything printed inside the block
    still goes to stdout and, once the block succeeds, `<output>/report.md` holds `title`, the
    provenance line and what was printed: runs of Markdown table rows as tables, the rest in text
    blocks, as printed."""
    report = {"provenance": provenance(arguments, prog)}
    printed = io.StringIO()
    with contextlib.redirect_stdout(_Tee(sys.stdout, printed)):
        yield report
    lines = [f"# {title}", "", provenance_line(report["provenance"]), ""]
    for is_table, run in itertools.groupby(printed.getvalue().rstrip("\n").split("\n"), key=lambda line: line.startswith("|")):
        run = "\n".join(run).strip("\n")
        if run:
            lines += [run, ""] if is_table else ["```text", run, "```", ""]
    atomic_write_text(os.path.join(report["output"], "report.md"), "\n".join(lines))


def add_ratios(summary: dict, runs: list[dict], sources: dict[str, dict[str, float]], pools: dict[str, list[str]]) -> dict:
    """Every entry's accuracy against its pool's best source per domain (`ratio_to_sources`): per
    domain (from the seed-mean accuracy), and the mean and worst ratio over domains with their std
    over seeds (each seed's run against the same ceiling). -> pool -> domain -> [best source, its accuracy]."""
    from fusion.stages.evaluation import best_sources, ratio_to_sources

    if not sources:
        return {}
    best = {pool: best_sources({n: sources[n] for n in names if n in sources}) for pool, names in pools.items()}
    for method, entry in summary.items():
        for pool, result in entry.items():
            ceiling = {d: value for d, (_, value) in best[pool].items()}
            overall = ratio_to_sources(result["acc"], ceiling)
            per_seed = [ratio_to_sources(r["acc"], ceiling) for r in runs if r["method"] == method and r["pool"] == pool]
            result |= {"ratio": overall["ratio"], "ratio_undefined": overall["undefined"]}
            for key in ("ratio_mean", "ratio_min"):
                values = [r[key] for r in per_seed if r[key] is not None]
                result[key] = statistics.fmean(values) if values else None
                result[f"{key}_std"] = std(values) if values else None
    return {pool: {d: list(v) for d, v in b.items()} for pool, b in best.items()}


def validation_curve(log_dir: str) -> dict[int, dict[str, float]]:
    """step -> accuracy per domain on the validation split, from a run's CSVLogger metrics.csv."""
    path = os.path.join(log_dir, "metrics.csv")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        rows = [row for row in csv.DictReader(f) if row.get("val/acc_mean")]
    return {
        int(row["step"]) + 1: {
            k.removeprefix("val/acc_"): float(v) for k, v in row.items() if k.startswith("val/acc_") and k != "val/acc_mean" and v
        }
        for row in rows
    }


def learning_curves(runs: list[dict], sources_val: dict[str, dict[str, float]], pools: dict[str, list[str]]) -> dict:
    """Per method and pool: the mean and worst ratio to the pool's best source on the validation
    split (each source's own answers to the same prompts) at every validation step, averaged over
    seeds. -> method -> pool -> [[step, mean ratio, worst ratio], ...]"""
    from fusion.stages.evaluation import best_sources, ratio_to_sources

    if not sources_val:
        return {}
    ceilings = {
        pool: {d: v for d, (_, v) in best_sources({n: sources_val[n] for n in names if n in sources_val}).items()}
        for pool, names in pools.items()
    }
    by_step: dict[tuple[str, str], dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        for step, acc in validation_curve(run.get("log_dir") or "").items():
            by_step[(run["method"], run["pool"])][step].append(ratio_to_sources(acc, ceilings[run["pool"]]))
    curves: dict[str, dict] = defaultdict(dict)
    for (method, pool), steps in sorted(by_step.items()):
        points = []
        for step, ratios in sorted(steps.items()):
            means = [r["ratio_mean"] for r in ratios if r["ratio_mean"] is not None]
            worsts = [r["ratio_min"] for r in ratios if r["ratio_min"] is not None]
            if means:
                points.append([step, statistics.fmean(means), statistics.fmean(worsts)])
        curves[method][pool] = points
    return dict(curves)


RATIO_TARGETS = {"mean_ratio_at_least_0.85": ("ratio_mean", 0.85), "worst_ratio_at_least_0.5": ("ratio_min", 0.5)}


def criteria_ratio(summary: dict, methods: dict[str, dict]) -> dict[str, dict]:
    """Each selector method against the sources, per pool: its mean ratio over domains at least
    0.85 and its worst domain's at least 0.5 (the seed means; see `add_ratios`)."""
    checks: dict[str, dict] = {}
    for name, method in methods.items():
        if method.get("fusion") != "selector" or name not in summary:
            continue
        for key, (field, bound) in RATIO_TARGETS.items():
            check = {
                pool: {field: r[field], f"{field}_std": r[f"{field}_std"], "pass": r[field] >= bound - 1e-12}
                for pool, r in sorted(summary[name].items())
                if r.get(field) is not None
            }
            if check:
                checks.setdefault(name, {})[key] = check
    return checks


def merge_criteria(*parts: dict[str, dict]) -> dict[str, dict]:
    """method -> check name -> result, from several sets of checks."""
    merged: dict[str, dict] = {}
    for part in parts:
        for method, checks in part.items():
            merged.setdefault(method, {}).update(checks)
    return merged


def criteria_floor(summary: dict, base: str) -> dict[str, dict]:
    """Every method at or above the untrained student (`base`), in each pool: a method that ends
    below it is reported, never hidden behind a gain over another method."""
    if base not in summary or SPECIALISTS not in summary[base]:
        return {}
    floor = summary[base][SPECIALISTS]["acc_mean"]
    checks: dict[str, dict] = {}
    for method, entry in summary.items():
        if method == base:
            continue
        check = {
            pool: {"method": r["acc_mean"], "method_std": r["acc_mean_std"], "untrained": floor, "pass": r["acc_mean"] >= floor - 1e-12}
            for pool, r in sorted(entry.items())
        }
        checks.setdefault(method, {})["at_least_untrained_student"] = check
    return checks


def on_policy(method: dict) -> bool:
    """A method that learns along the student's own samples: on-policy fusion, or SRFT's rollouts."""
    return method.get("response_from") == "student" or "srft" in method


def _selectors(summary: dict, methods: dict[str, dict], learns_on_policy: bool = False):
    """(by_fusion: fusion setting -> method name, [(name, summary entry) of every selector method]),
    among the off-policy methods (or the on-policy ones)."""
    chosen = {name: m for name, m in methods.items() if on_policy(m) == learns_on_policy and "srft" not in m and name in summary}
    by_fusion = {m["fusion"]: name for name, m in chosen.items() if m.get("fusion")}
    return by_fusion, [(name, summary[name]) for name, m in chosen.items() if m.get("fusion") == "selector"]


def _interference_at_most_half(summary: dict, by_fusion: dict, entry: dict, bases: tuple[str, ...]) -> dict | None:
    """The selector's interference against half of each base method's, or None where not measured."""
    own = entry.get(SPECIALISTS, {}).get("interference")
    bounds = {base: summary[by_fusion[base]].get(SPECIALISTS, {}).get("interference") for base in bases if base in by_fusion}
    bounds = {base: v for base, v in bounds.items() if v is not None}
    if own is None or not bounds:
        return None
    return {"selector": own, **bounds, "pass": all(own <= 0.5 * v for v in bounds.values())}


def criteria(summary: dict, methods: dict[str, dict], oracle: dict[str, str]) -> dict[str, dict]:
    """The labelled regime's checks for every selector method, with the numbers they compare."""
    by_fusion, selectors = _selectors(summary, methods)
    checks: dict[str, dict] = {}
    for name, entry in selectors:
        check = {}
        if (half := _interference_at_most_half(summary, by_fusion, entry, ("avgce", "uniform"))) is not None:
            check["interference_at_most_half"] = half
        for pool, result in entry.items():  # supplementary: the loss to every non-specialist source, per pool
            if result.get("specialist_gap") is None:
                continue
            bounds = {base: summary[by_fusion[base]][pool].get("specialist_gap") for base in ("avgce", "uniform") if base in by_fusion}
            bounds = {base: v for base, v in bounds.items() if v is not None}
            if bounds:
                check.setdefault("specialist_gap_at_most_half", {})[pool] = {
                    "selector": result["specialist_gap"],
                    **bounds,
                    "pass": all(result["specialist_gap"] <= 0.5 * v for v in bounds.values()),
                }
        if "mince" in by_fusion:
            mince = summary[by_fusion["mince"]]
            check["acc_at_least_mince"] = {
                pool: {
                    "selector": entry[pool]["acc_mean"],
                    "selector_std": entry[pool]["acc_mean_std"],
                    "mince": mince[pool]["acc_mean"],
                    "mince_std": mince[pool]["acc_mean_std"],
                    "forwards": f"{entry[pool]['source_forwards_per_seq']} of {mince[pool]['source_forwards_per_seq']}",
                    "pass": entry[pool]["acc_mean"] >= mince[pool]["acc_mean"],
                }
                for pool in entry
                if pool in mince
            }
        check["heatmap_picks_specialist"] = {}
        for pool, result in entry.items():
            if "selection_by_domain" not in result:
                continue
            by_domain = result["selection_by_domain"]
            picks = {d: max(shares, key=shares.get) for d, shares in by_domain.items()}
            specialist = {d: by_domain[d].get(oracle.get(d), 0.0) for d in picks}
            check["heatmap_picks_specialist"][pool] = {  # the specialist is picked at least as often as any other source
                "top_source": picks,
                "specialist_share": specialist,
                "pass": all(oracle.get(d) in by_domain[d] and specialist[d] >= by_domain[d][picks[d]] - 1e-9 for d in picks),
            }
        checks[name] = check
    return checks


def criteria_unlabeled(summary: dict, methods: dict[str, dict]) -> dict[str, dict]:
    """The label-scarce regime's checks for every selector method, with the numbers they compare:
    at least `none` + 0.08 and within 0.02 of the oracle in each pool, at least `confidence` +
    0.05 in pool B, interference at most half of uniform's and of confidence's."""
    by_fusion, selectors = _selectors(summary, methods)
    checks: dict[str, dict] = {}
    for name, entry in selectors:
        check = {}
        for base, margin, key, pools in (
            ("none", 0.08, "gain_over_none_at_least_0.08", (SPECIALISTS, DISTRACTED)),
            ("oracle", -0.02, "within_0.02_of_oracle", (SPECIALISTS, DISTRACTED)),
            ("confidence", 0.05, "confidence_plus_0.05", (DISTRACTED,)),
        ):
            if base not in by_fusion:
                continue
            reference = summary[by_fusion[base]]
            check[key] = {
                pool: {
                    "selector": entry[pool]["acc_mean"],
                    "selector_std": entry[pool]["acc_mean_std"],
                    base: reference[pool]["acc_mean"],
                    f"{base}_std": reference[pool]["acc_mean_std"],
                    "pass": entry[pool]["acc_mean"] >= reference[pool]["acc_mean"] + margin - 1e-12,
                }
                for pool in pools
                if pool in entry and pool in reference
            }
        if (half := _interference_at_most_half(summary, by_fusion, entry, ("uniform", "confidence"))) is not None:
            check["interference_at_most_half"] = half
        checks[name] = check
    return checks | criteria_on_policy(summary, methods)


def criteria_on_policy(summary: dict, methods: dict[str, dict]) -> dict[str, dict]:
    """Each on-policy selector method against the off-policy selector with the same top_k (at
    least its accuracy; and at least that run continued off-policy, where the on-policy method is
    a stage after it and the bench has that continuation) and the on-policy oracle (within 0.02),
    in each pool."""
    off_policy = {name: m for name, m in methods.items() if not on_policy(m) and m.get("fusion") == "selector" and name in summary}
    by_fusion, selectors = _selectors(summary, methods, learns_on_policy=True)
    checks: dict[str, dict] = {}
    for name, entry in selectors:
        check = {}
        top_k, after = methods[name].get("top_k", 2), methods[name].get("after")
        twin = next((n for n, m in off_policy.items() if m.get("top_k", 2) == top_k and "after" not in m), None)
        # An on-policy stage after an off-policy run also faces the same run continued off-policy for as many steps.
        continued = next((n for n, m in off_policy.items() if m.get("top_k", 2) == top_k and after and m.get("after") == after), None)
        for reference, margin, key in (
            (twin, 0.0, "at_least_off_policy_selector"),
            (continued, 0.0, "at_least_off_policy_continued"),
            (by_fusion.get("oracle"), -0.02, "within_0.02_of_on_policy_oracle"),
        ):
            if reference is None:
                continue
            check[key] = {
                pool: {
                    "on_policy": entry[pool]["acc_mean"],
                    "on_policy_std": entry[pool]["acc_mean_std"],
                    reference: summary[reference][pool]["acc_mean"],
                    f"{reference}_std": summary[reference][pool]["acc_mean_std"],
                    "pass": entry[pool]["acc_mean"] >= summary[reference][pool]["acc_mean"] + margin - 1e-12,
                }
                for pool in (SPECIALISTS, DISTRACTED)
                if pool in entry and pool in summary[reference]
            }
        checks[name] = check
    return checks


# ------------------------------------------------------------------------------------ Markdown


def _cell(mean: float, spread: float | None) -> str:
    return f"{mean:.3f} ± {spread:.3f}" if spread is not None else f"{mean:.3f}"


def markdown(report: dict, config_yaml: str) -> str:
    """The table (accuracy per domain, mean ± std over seeds, interference), the criteria and the config."""
    summary = report["results"]
    domains = sorted({d for entry in summary.values() for pool in entry.values() for d in pool["acc"]})
    costs = any("generations_per_prompt" in r for entry in summary.values() for r in entry.values())
    sampling = any("sampled_tokens_per_step" in r for entry in summary.values() for r in entry.values())
    lines = [f"# Quality benchmark{' (quick)' if report['quick'] else ''}", ""]
    if report.get("provenance"):
        p = report["provenance"]
        rewritten = " The report was rewritten from the stored runs (`--report_only`)." if report.get("report_only") else ""
        lines += [provenance_line(p) + rewritten, ""]
    lines += [
        f"Test accuracy (exact match) per domain, mean over seeds {report['seeds']}; "
        "`mean` is the mean over domains, ± its std over seeds; interference = mean over domains of "
        "max(0, acc_A - acc_B) from the seed-mean accuracies (and per seed, paired: mean ± std). "
        "Pool A: the specialists; pool B: A plus the distractors. Specialist gap = mean over domains of "
        "max(0, acc_oracle - acc) in the same pool: the accuracy lost to every source other than the "
        "domain's specialist (per seed, paired with the oracle's run of that seed).",
        "",
        "| method | pool | source forwards / seq | "
        + " | ".join(domains)
        + " | mean | interference (per seed) | specialist gap (per seed) |"
        + (" generations / unlabeled prompt | seconds: cache, run |" if costs else "")
        + (" sampled tokens / step |" if sampling else ""),
        "|---|---|---|" + "---|" * (len(domains) + 3 + (2 if costs else 0) + (1 if sampling else 0)),
    ]
    for method, entry in summary.items():
        for pool in sorted(entry):
            r = entry[pool]
            extra = ""
            if costs:
                generations = f"{r['generations_per_prompt']:.2f}" if "generations_per_prompt" in r else "-"
                seconds = f"{r.get('cache_seconds', 0):.0f}, {r['seconds_mean']:.0f}" if "seconds_mean" in r else "-"
                extra = f" {generations} | {seconds} |"
            if sampling:
                extra += f" {r['sampled_tokens_per_step']:.0f} |" if "sampled_tokens_per_step" in r else " - |"
            cells = " | ".join(f"{r['acc'][d]:.2f}" for d in domains)
            inter = "-"
            if r.get("interference") is not None:
                inter = f"{r['interference']:.3f} ({_cell(r['interference_per_seed_mean'], r['interference_per_seed_std'])})"
            gap = "-"
            if r.get("specialist_gap") is not None:
                gap = f"{r['specialist_gap']:.3f} ({_cell(r['specialist_gap_per_seed_mean'], r['specialist_gap_per_seed_std'])})"
            label = method + (f" (= {r['shared_with']})" if r.get("shared_with") else "")
            lines.append(
                f"| {label} | {pool} | {r['source_forwards_per_seq']} | {cells} | "
                f"{_cell(r['acc_mean'], r['acc_mean_std'])} | {inter} | {gap} |{extra}"
            )
    if report.get("sources"):
        lines += ["", *ratio_table(report, domains)]
    if answers := answers_table(summary):
        lines += ["", *answers]
    if report.get("fused_teacher"):
        lines += ["", *teacher_table(report["fused_teacher"])]
    if report.get("learning_curves"):
        lines += ["", *curve_table(report["learning_curves"])]
    notes = [f"- {m}: {e[p]['note']}" for m, e in summary.items() for p in sorted(e)[:1] if e[p].get("note")]
    if notes:
        lines += ["", "Notes:", *notes]
    lines += ["", "## Criteria", ""]
    for method, check in report["criteria"].items():
        for name, value in check.items():
            lines.append(f"- {method}, {name}: {_verdict(value)}")
    if report.get("consistency"):
        c = report["consistency"]
        lines += [
            "",
            "## Cached versus online",
            "",
            f"{c['method']} on pool {c['pool']}, seed {c['seed']}, same settings: mean accuracy cached "
            f"{c['cached']['acc_mean']:.3f}, online {c['online']['acc_mean']:.3f} (difference {c['difference']:+.3f}; "
            f"largest per-domain difference {c['max_domain_difference']:.3f}); {c['cached_seconds']:.0f} s cached, "
            f"{c['online_seconds']:.0f} s online.",
        ]
    reused = (
        f" ({report['runs_reused']} of {report['runs']} runs reused from an earlier invocation; each run's own seconds are in report.json)"
        if report.get("runs_reused")
        else ""
    )
    lines += [
        "",
        f"Runtime of this invocation: {report['runtime_seconds']:.0f} s{reused}.",
        "",
        "## Configuration",
        "",
        "```yaml",
        config_yaml.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _ratio_cell(value: float | None, spread: float | None = None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}" if spread is None else f"{value:.2f} ± {spread:.2f}"


def ratio_table(report: dict, domains: list[str]) -> list[str]:
    """The sources' own accuracy, then every method's ratio to its pool's best source per domain."""
    sources, best = report["sources"], report["best_source"]
    lines = [
        "## Against the sources",
        "",
        "Each source's own greedy accuracy on the same test prompts (its own tokenizer), then each method's "
        "ratio: its accuracy per domain divided by the best source of its pool there (n/a where no source of "
        "the pool answers the domain at all); mean and worst over domains, ± their std over seeds.",
        "",
        "| source | " + " | ".join(domains) + " | best in pool |",
        "|---|" + "---|" * (len(domains) + 1),
    ]
    for name, acc in sources.items():
        pools = [pool for pool, b in sorted(best.items()) if any(b[d][0] == name for d in b)]
        lines.append(f"| {name} | " + " | ".join(f"{acc.get(d, 0.0):.2f}" for d in domains) + f" | {', '.join(pools) or '-'} |")
    lines += [
        "",
        "| method | pool | " + " | ".join(f"ratio {d}" for d in domains) + " | mean ratio | worst ratio |",
        "|---|---|" + "---|" * (len(domains) + 2),
    ]
    for method, entry in report["results"].items():
        for pool in sorted(entry):
            r = entry[pool]
            if "ratio" not in r:
                continue
            cells = " | ".join(_ratio_cell(r["ratio"].get(d)) for d in domains)
            lines.append(
                f"| {method} | {pool} | {cells} | {_ratio_cell(r['ratio_mean'], r['ratio_mean_std'])} | "
                f"{_ratio_cell(r['ratio_min'], r['ratio_min_std'])} |"
            )
    return lines


def fused_teachers(groups: dict[str, list[str]], teachers: dict[str, dict], best: dict, results: dict) -> dict:
    """Per teacher domain: its sources, the fused teacher's accuracy and its ratio to pool A's best
    source there, its forwards per token; and per method and pool, the student's accuracy there
    (mean ± std over seeds) and the share of the teacher's accuracy it reaches."""
    report = {}
    for domain, names in groups.items():
        if domain not in teachers:
            continue
        teacher = teachers[domain]["acc"]
        source = best.get("A", {}).get(domain, (None, 0.0))
        students = {
            method: {
                pool: {
                    "acc": r["acc"][domain],
                    "acc_std": r["acc_std"][domain],
                    "of_teacher": r["acc"][domain] / teacher if teacher else None,
                }
                for pool, r in sorted(entry.items())
                if domain in r.get("acc", {})
            }
            for method, entry in results.items()
        }
        report[domain] = {
            "sources": names,
            "acc": teacher,
            "best_source": list(source),
            "ratio_to_best_source": teacher / source[1] if source[1] else None,
            "source_forwards_per_token": teachers[domain]["source_forwards_per_token"],
            "students": students,
        }
    return report


def answers_table(summary: dict) -> list[str]:
    """What each method's student learns along on the prompts without gold: how often those answers
    are right per domain, and what writing them costs in source forwards."""
    rows = [(m, p, r) for m, e in summary.items() for p, r in sorted(e.items()) if "answer_accuracy" in r]
    if not rows:
        return []
    domains = sorted({d for _, _, r in rows for d in r["answer_accuracy"]})
    lines = [
        "## The answers the student learns along",
        "",
        "On the prompts without gold: the share of the answers the task's scorer accepts (the seeded generators "
        "draw those prompts again with their gold), sources that wrote each answer, and source forwards: per "
        "answer token (the top source generates with a key-value cache, one forward per token; sources that "
        "answer together run every one of them over the whole text at every token) and per trained token (the "
        "sources that run along the answer, once, when the cache is written).",
        "",
        "| method | pool | " + " | ".join(f"answers right: {d}" for d in domains) + " | sources per answer | "
        "source forwards / answer token | source forwards / trained token |",
        "|---|---|" + "---|" * (len(domains) + 3),
    ]
    for method, pool, r in rows:
        fused = r.get("answer_from") == "fused"
        per_token = f"{r['generations_per_prompt']:.2f} (whole text)" if fused else "1"
        cells = " | ".join(f"{r['answer_accuracy'].get(d, 0.0):.3f}" for d in domains)
        lines.append(f"| {method} | {pool} | {cells} | {r['generations_per_prompt']:.2f} | {per_token} | {r['source_forwards_per_seq']} |")
    return lines


def teacher_table(teachers: dict) -> list[str]:
    """The fused teacher of each domain beside its best source, and what each student reaches of it."""
    lines = [
        "## Against the fused teacher",
        "",
        "The named sources decoding the domain's test prompts together, greedily from their mixture with equal "
        "weights (a source forward of each per generated token): the accuracy a student distilled from them could "
        "reach. Then each method's accuracy there (± std over seeds), divided by the best source's and by the teacher's.",
        "",
        "| domain | fused teacher | its sources | best source alone | teacher / best source |",
        "|---|---|---|---|---|",
    ]
    for domain, t in teachers.items():
        ratio = "n/a" if t["ratio_to_best_source"] is None else f"{t['ratio_to_best_source']:.2f}"
        lines.append(
            f"| {domain} | {t['acc']:.3f} | {' + '.join(t['sources'])} | {t['best_source'][0]} {t['best_source'][1]:.3f} | {ratio} |"
        )
    lines += ["", "| method | pool | domain | accuracy | / best source | / fused teacher |", "|---|---|---|---|---|---|"]
    for domain, t in teachers.items():
        for method, pools in t["students"].items():
            for pool, r in pools.items():
                best = f"{r['acc'] / t['best_source'][1]:.2f}" if t["best_source"][1] else "n/a"
                share = "n/a" if r["of_teacher"] is None else f"{r['of_teacher']:.2f}"
                lines.append(f"| {method} | {pool} | {domain} | {_cell(r['acc'], r['acc_std'])} | {best} | {share} |")
    return lines


def curve_table(curves: dict) -> list[str]:
    """Mean ratio (worst in brackets) on the validation split against training steps."""
    steps = sorted({point[0] for entry in curves.values() for points in entry.values() for point in points})
    lines = [
        "## Learning curves",
        "",
        "Mean ratio to the pool's best source on the validation split (worst domain's in "
        "brackets) after each number of optimizer steps, mean over seeds (`learning_curve.png`).",
        "",
        "| method | pool | " + " | ".join(str(s) for s in steps) + " |",
        "|---|---|" + "---|" * len(steps),
    ]
    for method, entry in curves.items():
        for pool, points in sorted(entry.items()):
            at = {p[0]: p for p in points}
            cells = " | ".join(f"{at[s][1]:.2f} ({at[s][2]:.2f})" if s in at else "" for s in steps)
            lines.append(f"| {method} | {pool} | {cells} |")
    return lines


def _verdict(value: dict) -> str:
    if "pass" in value:
        numbers = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items() if k != "pass")
        return f"{'PASS' if value['pass'] else 'FAIL'} ({numbers})"
    return "; ".join(f"pool {pool}: {_verdict(v)}" for pool, v in value.items())


# ------------------------------------------------------------------------------------ plots


def selection_entropy_curve(log_dir: str) -> list[tuple[int, float]]:
    """(step, train/selection_entropy) from a run's CSVLogger metrics.csv."""
    path = os.path.join(log_dir, "metrics.csv")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [
            (int(row["step"]), float(row["train/selection_entropy"])) for row in csv.DictReader(f) if row.get("train/selection_entropy")
        ]


def sampled_tokens_per_step(log_dir: str) -> float | None:
    """Tokens the student sampled per training step (`train/sampled_tokens` of on-policy fusion,
    `train/generated_tokens` of SRFT; 0 on an off-policy step), the mean over the steps in the
    run's metrics.csv; None for a run that samples nothing (or has no log)."""
    path = os.path.join(log_dir, "metrics.csv")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        rows = [row for row in csv.DictReader(f) if row.get("train/loss")]
    keys = ("train/sampled_tokens", "train/generated_tokens")
    if not rows or not any(row.get(key) for row in rows for key in keys):
        return None
    return statistics.fmean(float(next((row[key] for key in keys if row.get(key)), 0.0)) for row in rows)


def selector_bias(log_dir: str, after: float = 0.5) -> dict[str, float]:
    """Per source, the selector's mean signed error u_i + CE_i on observed pairs over the last half
    of training (the `bias/<source>` logs): > 0 where it overrates the source, < 0 where it
    underrates it. Empty for a run without a selector."""
    path = os.path.join(log_dir, "metrics.csv")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    last = max(int(row["step"]) for row in rows)
    values: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        if int(row["step"]) >= after * last:
            for key, value in row.items():
                if key.startswith("bias/") and value:
                    values[key.removeprefix("bias/")].append(float(value))
    return {name: statistics.fmean(v) for name, v in values.items()}


def _save(figure, path: str) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    with atomic_open(path, "wb") as f:
        f.write(buffer.getvalue())
    return path


def plots(report: dict, runs: list[dict], output: str) -> list[str]:
    """accuracy.png, interference.png, selection_heatmap.png, selection_entropy.png under `output`."""
    import numpy as np

    from fusion.utils.optional import pyplot

    plt = pyplot()

    summary, written = report["results"], []
    pools = sorted({p for e in summary.values() for p in e})
    domains = sorted({d for e in summary.values() for r in e.values() for d in r["acc"]})
    methods = list(summary)

    figure, axes = plt.subplots(1, len(pools), figsize=(7 * len(pools), 4.5), squeeze=False, sharey=True)
    width = 0.8 / max(1, len(methods))
    colors = plt.get_cmap("tab20" if len(methods) > 10 else "tab10")  # one colour per method
    for ax, pool in zip(axes[0], pools):
        for i, method in enumerate(methods):
            if pool not in summary[method]:
                continue
            r = summary[method][pool]
            x = np.arange(len(domains) + 1) + i * width
            values = [r["acc"][d] for d in domains] + [r["acc_mean"]]
            errors = [r["acc_std"][d] for d in domains] + [r["acc_mean_std"]]
            ax.bar(x, values, width, yerr=errors, label=method, capsize=2, color=colors(i % colors.N))
        ax.set_xticks(np.arange(len(domains) + 1) + 0.4 - width / 2, [*domains, "mean"], rotation=20)
        ax.set_title(f"pool {pool}")
        ax.set_ylabel("test accuracy")
    axes[0][-1].legend(fontsize=7, loc="upper right")
    written.append(_save(figure, os.path.join(output, "accuracy.png")))
    plt.close(figure)

    with_inter = [m for m in methods if summary[m].get(SPECIALISTS, {}).get("interference") is not None]
    figure, ax = plt.subplots(figsize=(max(5, 1.1 * len(with_inter)), 3.8))
    values = [summary[m][SPECIALISTS]["interference"] for m in with_inter]
    errors = [summary[m][SPECIALISTS]["interference_per_seed_std"] or 0.0 for m in with_inter]
    ax.bar(range(len(with_inter)), values, yerr=errors, capsize=3, color="tab:red")
    ax.set_xticks(range(len(with_inter)), with_inter, rotation=25, ha="right")
    ax.set_ylabel("interference (accuracy lost, A -> B)")
    written.append(_save(figure, os.path.join(output, "interference.png")))
    plt.close(figure)

    selectors = [m for m in methods if any("selection_by_domain" in summary[m].get(p, {}) for p in pools)]
    if selectors:  # one row per pool, one column per selector method
        figure, axes = plt.subplots(len(pools), len(selectors), figsize=(3.4 * len(selectors) + 1.5, 3.6 * len(pools)), squeeze=False)
        for row, pool in enumerate(pools):
            for column, method in enumerate(selectors):
                ax = axes[row][column]
                shares = summary[method].get(pool, {}).get("selection_by_domain")
                if not shares:
                    ax.axis("off")
                    continue
                sources = list(next(iter(shares.values())))
                matrix = np.array([[shares[d][s] for s in sources] for d in domains])
                ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis", aspect="auto")
                ax.set_xticks(range(len(sources)), sources, rotation=60, ha="right", fontsize=7)
                ax.set_yticks(range(len(domains)), domains if column == 0 else [], fontsize=7)
                for (i, j), value in np.ndenumerate(matrix):
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6, color="w" if value < 0.5 else "k")
                ax.set_title(f"{method}, pool {pool}", fontsize=8)
        figure.suptitle("share of test prompts of each domain (rows) for which the selector picks each source (columns)", fontsize=9)
        figure.tight_layout()
        written.append(_save(figure, os.path.join(output, "selection_heatmap.png")))
        plt.close(figure)

    if report.get("learning_curves"):
        figure, ax = plt.subplots(figsize=(6.5, 4))
        for method, entry in report["learning_curves"].items():
            for pool, points in sorted(entry.items()):
                if points:
                    ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=f"{method}, pool {pool}")
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("mean ratio to the best source (validation)")
        ax.legend(fontsize=7)
        written.append(_save(figure, os.path.join(output, "learning_curve.png")))
        plt.close(figure)

    curves: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        for step, value in selection_entropy_curve(run.get("log_dir") or ""):
            curves[(run["method"], run["pool"])][step].append(value)
    if curves:
        figure, ax = plt.subplots(figsize=(6.5, 4))
        for (method, pool), by_step in sorted(curves.items()):
            steps = sorted(by_step)
            ax.plot(steps, [statistics.fmean(by_step[s]) for s in steps], label=f"{method}, pool {pool}")
        ax.set_xlabel("training step")
        ax.set_ylabel("selection entropy (nats, batch share)")
        ax.legend(fontsize=7)
        written.append(_save(figure, os.path.join(output, "selection_entropy.png")))
        plt.close(figure)
    return written


def write_report(report: dict, runs: list[dict], config_yaml: str, output: str) -> list[str]:
    """report.json, report.md and the plots under `output`, each written atomically."""
    atomic_write_json(os.path.join(output, "report.json"), report)
    atomic_write_text(os.path.join(output, "report.md"), markdown(report, config_yaml))
    return [os.path.join(output, "report.json"), os.path.join(output, "report.md"), *plots(report, runs, output)]
