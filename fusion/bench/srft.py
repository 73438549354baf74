"""SRFT against its ablations: `python -m fusion.bench srft [--quick] [--seeds 0 1 2]`.

From the same starting student (the SRFT config's `model.init_from`), at equal optimizer steps
and equal rollouts (every variant samples G completions per prompt at every step, so each
generates the same number of sequences; only the loss uses them differently):

    srft         L_SFT_demo + L_RL_demo + L_RL_self with entropy-aware weights (the config's)
    sft_only     L_SFT_demo alone, constant weight (plain SFT on the demonstrations)
    rl_only      L_RL_self alone over the rollouts, constant weights, c = 1 (GRPO)
    sft_then_rl  sft_only for the first half of the steps, then rl_only from its adapter
    fusion_continued  the control: the fusion stage the start came from (`--fusion_config`'s
                 model section: its sources, selector and losses) trained on for the same
                 steps over the same data, at SRFT's learning rate; it samples nothing

Accuracy is greedy exact match judged by each task's scorer, in distribution (the suite's test
split) and out of distribution (the same generators at `tasks.HARDER_SETTINGS`), measured
along training; the entropy curve is the mean token entropy of the training rollouts. Writes
`report.json`, `report.md` (after its command, commit and machine) and PNG plots to `--output`,
each atomically, after every run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import lightning as L
import torch
import yaml

from fusion.bench._quality_report import provenance, provenance_line
from fusion.data import tasks
from fusion.data.datamodule import FusionDataModule, collate, encode
from fusion.stages.evaluation import greedy_answers
from fusion.stages.srft import SRFTModule
from fusion.utils.io import atomic_open, atomic_write_json, atomic_write_text

GRPO = {"mode": "rl_only", "weights": "constant", "rl_weight": 1.0}
SFT = {"mode": "sft_only", "weights": "constant"}
VARIANTS = {  # name -> the settings of each phase (phases split the steps evenly)
    "srft": [{"mode": "srft"}],
    "sft_only": [SFT],
    "rl_only": [GRPO],
    "sft_then_rl": [SFT, GRPO],
    "srft_constant": [{"mode": "srft", "weights": "constant"}],  # an extra ablation, not run by default
    "fusion_continued": [{"fusion": True}],  # FusionDistillModule, not SRFTModule (`fusion_module`)
}
DEFAULT_VARIANTS = ["srft", "sft_only", "rl_only", "sft_then_rl", "fusion_continued"]


class Curves(L.Callback):
    """Accuracy every `every` steps, and the rollouts' entropy and generated tokens at every step."""

    def __init__(self, evaluate, every: int, offset: int, record: dict):
        self.evaluate, self.every, self.offset, self.record = evaluate, every, offset, record

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        metrics = trainer.callback_metrics
        if "train/entropy" in metrics:  # a rollout step (the fusion control samples nothing)
            self.record["entropy"].append(float(metrics["train/entropy"]))
            self.record["generated_tokens"] += int(metrics["train/generated_tokens"])
        if trainer.global_step % self.every == 0:
            self.record["points"].append({"step": self.offset + trainer.global_step, **self.evaluate(module)})


def fusion_module(fusion: dict, model: dict, init_from: str | None):
    """The fusion control: the fusion stage of `fusion` (a fusion.train config's model section)
    from `init_from`, at the SRFT stage's learning rate and warm-up."""
    from fusion.stages.fusion import FusionDistillModule

    settings = {"learning_rate": model.get("learning_rate", 2e-3), "warmup_steps": model.get("warmup_steps", 10)}
    return FusionDistillModule(**{**fusion, **settings, "init_from": init_from})


def run_variant(
    name: str, seed: int, model: dict, data: dict, steps: int, every: int, evaluate, workdir: str, fusion: dict | None = None
) -> dict:
    """One variant, one seed: its phases in sequence, each from the previous phase's adapter."""
    L.seed_everything(seed, verbose=False)
    record = {"variant": name, "seed": seed, "points": [], "entropy": [], "generated_tokens": 0}
    phases = VARIANTS[name]
    started, init_from = time.time(), model["init_from"]
    for index, settings in enumerate(phases):
        if settings.get("fusion"):
            if fusion is None:
                raise ValueError(f"variant {name!r} needs --fusion_config: the fusion run that model.init_from comes from")
            module = fusion_module(fusion, model, init_from)
        else:
            module = SRFTModule(**{**model, **settings, "init_from": init_from})
        if index == 0:
            record["points"].append({"step": 0, **evaluate(module)})
        phase_steps = steps // len(phases) if index < len(phases) - 1 else steps - (len(phases) - 1) * (steps // len(phases))
        offset = index * (steps // len(phases))
        trainer = L.Trainer(
            max_steps=phase_steps,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            callbacks=[Curves(evaluate, every, offset, record)],
        )
        trainer.fit(module, datamodule=FusionDataModule(tokenizer=model["student"], **data))
        if record["points"][-1]["step"] != offset + phase_steps:
            record["points"].append({"step": offset + phase_steps, **evaluate(module)})
        if index < len(phases) - 1:  # hand the adapter to the next phase, as a user would
            init_from = os.path.join(workdir, f"{name}-seed{seed}-phase{index}.ckpt")
            trainer.save_checkpoint(init_from, weights_only=True)
    record["seconds"] = time.time() - started
    return record


def greedy_scores(model, tokenizer, rows: list[dict], max_new_tokens: int, batch_size: int = 200) -> tuple[dict, dict]:
    """Per domain: exact-match accuracy and the mean task score (the scorer's partial credit)."""
    hits: dict[str, list[float]] = {}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = collate([encode(tokenizer, r["prompt"], r["response"], 64) | {"row": r} for r in chunk], tokenizer.pad_token_id)
        answers = greedy_answers(model, tokenizer, batch["prompt_ids"], batch["prompt_attention_mask"], max_new_tokens)
        for row, answer in zip(chunk, answers):
            hits.setdefault(row["domain"], []).append(tasks.score(row["domain"], answer, row))
    accuracy = {d: statistics.fmean(s >= 1.0 for s in v) for d, v in sorted(hits.items())}
    return accuracy, {d: statistics.fmean(v) for d, v in sorted(hits.items())}


def make_evaluator(in_rows: list[dict], out_rows: list[dict], max_new_tokens: int):
    def evaluate(module: SRFTModule) -> dict:
        was_training = module.student.training
        module.student.eval()
        result = {}
        for name, rows in (("id", in_rows), ("ood", out_rows)):
            accuracy, score = greedy_scores(module.student, module.tokenizer, rows, max_new_tokens)
            result |= {
                f"acc_{name}": accuracy,
                f"acc_{name}_mean": statistics.fmean(accuracy.values()),
                f"score_{name}": score,
                f"score_{name}_mean": statistics.fmean(score.values()),
            }
        module.student.train(was_training)
        return result

    return evaluate


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict]) -> dict:
    """Per variant: final accuracy in and out of distribution, entropy and tokens, mean and std over seeds."""
    summary = {}
    for name in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == name]
        last_entropy = [statistics.fmean(r["entropy"][-max(1, len(r["entropy"]) // 10) :]) for r in mine if r["entropy"]]
        summary[name] = {
            "seeds": [r["seed"] for r in mine],
            "acc_id": mean_std([r["points"][-1]["acc_id_mean"] for r in mine]),
            "acc_ood": mean_std([r["points"][-1]["acc_ood_mean"] for r in mine]),
            "score_id": mean_std([r["points"][-1]["score_id_mean"] for r in mine]),
            "score_ood": mean_std([r["points"][-1]["score_ood_mean"] for r in mine]),
            "acc_id_by_domain": {d: mean_std([r["points"][-1]["acc_id"][d] for r in mine])[0] for d in mine[0]["points"][-1]["acc_id"]},
            "acc_ood_by_domain": {d: mean_std([r["points"][-1]["acc_ood"][d] for r in mine])[0] for d in mine[0]["points"][-1]["acc_ood"]},
            "final_entropy": mean_std(last_entropy) if last_entropy else None,  # None: nothing sampled
            "generated_tokens": mean_std([float(r["generated_tokens"]) for r in mine]),
            "seconds": mean_std([r["seconds"] for r in mine]),
        }
    return summary


def markdown(report: dict) -> str:
    s = report["settings"]
    start = report["runs"][0]["points"][0] if report["runs"] else None
    lines = [
        f"# SRFT bench: {s['steps']} optimizer steps, {s['batch_size']} prompts x {s['num_generations']} rollouts per step, seeds {s['seeds']}",
        "",
        *([provenance_line(p), ""] if (p := report.get("provenance")) else []),
        f"Start: `{s['init_from']}`.",
        "Accuracy: greedy exact match, mean over domains; score: the task scorers' partial credit, mean over domains;",
        "mean ± std over seeds. Entropy: mean token entropy of the training rollouts over the last tenth of the steps",
        "(nats). Tokens: completion tokens sampled in all (every SRFT variant samples the same number of rollouts; the",
        "fusion control samples none: its sources score the same rows' answers).",
        "",
        "| variant | acc in distribution | acc out of distribution | score in distribution | score out of distribution | entropy | generated tokens | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if start:
        lines.append(
            f"| start | {start['acc_id_mean']:.3f} | {start['acc_ood_mean']:.3f} | {start['score_id_mean']:.3f} | {start['score_ood_mean']:.3f} | | | |"
        )
    for name, v in report["summary"].items():
        cells = " | ".join(
            f"{v[k][0]:.3f} ± {v[k][1]:.3f}" if v[k] else "-" for k in ("acc_id", "acc_ood", "score_id", "score_ood", "final_entropy")
        )
        lines.append(f"| {name} | {cells} | {v['generated_tokens'][0]:.0f} | {v['seconds'][0]:.0f} |")
    if report["summary"]:
        domains = list(next(iter(report["summary"].values()))["acc_id_by_domain"])
        lines += [
            "",
            "Per domain (mean over seeds), in distribution / out of distribution:",
            "",
            "| variant | " + " | ".join(domains) + " |",
            "|---|" + "---|" * len(domains),
        ]
        if start:
            lines.append("| start | " + " | ".join(f"{start['acc_id'][d]:.2f} / {start['acc_ood'][d]:.2f}" for d in domains) + " |")
        for name, v in report["summary"].items():
            lines.append(
                f"| {name} | " + " | ".join(f"{v['acc_id_by_domain'][d]:.2f} / {v['acc_ood_by_domain'][d]:.2f}" for d in domains) + " |"
            )
    return "\n".join(lines) + "\n"


def plot(report: dict, output: str) -> list[str]:
    """accuracy_id.png, accuracy_ood.png, score_ood.png, entropy.png: mean over seeds, shaded ± std."""
    import numpy as np

    from fusion.utils.optional import pyplot

    plt = pyplot()

    paths = []
    panels = [
        ("accuracy_id", "acc_id_mean", "accuracy in distribution"),
        ("accuracy_ood", "acc_ood_mean", "accuracy out of distribution"),
        ("score_ood", "score_ood_mean", "task score out of distribution"),
        ("entropy", None, "rollout entropy (nats)"),
    ]
    for filename, key, label in panels:
        figure, axis = plt.subplots(figsize=(6, 4))
        for name in dict.fromkeys(r["variant"] for r in report["runs"]):
            mine = [r for r in report["runs"] if r["variant"] == name]
            if key is None and not all(r["entropy"] for r in mine):
                continue  # nothing sampled
            if key is None:
                length = min(len(r["entropy"]) for r in mine)
                values = np.array([r["entropy"][:length] for r in mine])
                window = max(1, length // 20)  # a running mean: per-step entropy is noisy
                values = np.array([np.convolve(v, np.ones(window) / window, mode="valid") for v in values])
                steps = np.arange(values.shape[1]) + window
            else:
                length = min(len(r["points"]) for r in mine)
                values = np.array([[p[key] for p in r["points"][:length]] for r in mine])
                steps = np.array([p["step"] for p in mine[0]["points"][:length]])
            mean, std = values.mean(0), values.std(0)
            axis.plot(steps, mean, label=name)
            axis.fill_between(steps, mean - std, mean + std, alpha=0.2)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel(label)
        axis.legend()
        figure.tight_layout()
        path = os.path.join(output, f"{filename}.png")
        with atomic_open(path, "wb") as f:
            figure.savefig(f, format="png", dpi=100)
        plt.close(figure)
        paths.append(path)
    return paths


def write_report(report: dict, output: str) -> None:
    os.makedirs(output, exist_ok=True)
    report["summary"] = summarize(report["runs"])
    atomic_write_json(os.path.join(output, "report.json"), report)
    atomic_write_text(os.path.join(output, "report.md"), markdown(report))
    plot(report, output)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m fusion.bench srft", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/srft.yaml", help="SRFT config whose model and data sections are the base settings")
    parser.add_argument("--quick", action="store_true", help="one seed, 20 steps, 25 evaluation prompts per domain (about 2 minutes)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per variant (equal for all)")
    parser.add_argument("--eval_every", type=int, default=50)
    parser.add_argument("--eval_size", type=int, default=100, help="evaluation prompts per domain, in and out of distribution")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument("--init_from", default=None, help="override the config's model.init_from")
    parser.add_argument(
        "--fusion_config",
        default="configs/quickstart.yaml",
        help="the fusion.train config that model.init_from was trained with: its model section is the fusion_continued control",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads; tiny models decode faster on one (and the machine is shared)"
    )
    parser.add_argument("--output", default="checkpoints/bench/srft")
    arguments = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(arguments)
    if args.quick:
        args.seeds, args.steps, args.eval_every, args.eval_size = args.seeds[:1], 20, 10, 25
    torch.set_num_threads(args.threads)
    with open(args.config) as f:
        config = yaml.safe_load(f)
    model = dict(config["model"].get("init_args", config["model"]))
    if args.init_from is not None:
        model["init_from"] = args.init_from or None
    data = {k: v for k, v in config.get("data", {}).items() if k != "tokenizer"}
    fusion = None
    if "fusion_continued" in args.variants:
        with open(args.fusion_config) as f:
            fusion = dict(yaml.safe_load(f).get("model") or {})
        fusion = dict(fusion.get("init_args", fusion))
        if not fusion.get("sources"):
            raise ValueError(f"--fusion_config {args.fusion_config}: model.sources is empty; the fusion control needs the start's sources")
    domains = data.get("domains", tasks.DEFAULT_DOMAINS)
    in_rows = tasks.build_splits(domains, {"test": args.eval_size}, data.get("seed", 0))["test"]
    out_rows = [row for domain in domains for row in tasks.generate(domain, args.eval_size, tasks._seed("ood", domain), harder=True)]
    evaluate = make_evaluator(in_rows, out_rows, model.get("max_new_tokens", 24))
    workdir = os.path.join(args.output, "phases")
    os.makedirs(workdir, exist_ok=True)
    report = {
        "provenance": provenance(arguments, "python -m fusion.bench srft"),
        "settings": {
            "steps": args.steps,
            "eval_every": args.eval_every,
            "eval_size": args.eval_size,
            "seeds": args.seeds,
            "variants": {name: VARIANTS[name] for name in args.variants},
            "init_from": model.get("init_from"),
            "fusion_config": args.fusion_config if fusion is not None else None,
            "batch_size": data.get("batch_size", 32),
            "num_generations": model.get("num_generations", 8),
            "threads": args.threads,
            "model": model,
            "data": data,
        },
        "runs": [],
    }
    started = time.time()
    for seed in args.seeds:
        for name in args.variants:
            run = run_variant(name, seed, model, data, args.steps, args.eval_every, evaluate, workdir, fusion)
            report["runs"].append(run)
            last = run["points"][-1]
            print(
                f"{name} seed {seed}: acc in {last['acc_id_mean']:.3f}, out {last['acc_ood_mean']:.3f} ({run['seconds']:.0f} s)", flush=True
            )
            report["seconds"] = time.time() - started
            write_report(report, args.output)
    print("\n" + markdown(report) + f"\ntotal {time.time() - started:.0f} s; written to {args.output}")
    return report


if __name__ == "__main__":
    main()
