"""Training steps per second of each way to get the fusion target, next to plain SFT, in one run.

    python -m fusion.bench throughput [--vocab 32000] [--steps 20] [--batch_size 16] [--hidden_size 64 --layers 2]

One student and N = 4 sources of the same size (tiny Qwen2 built from config, one vocabulary),
the same batches for every method, and the same optimizer step:
    sft              plain SFT (`fusion: none`), the reference;
    selector-cached  the selector (k = 2) reading every source's top-K from the offline cache;
    selector-online  the selector running k = 2 of the N = 4 sources for each sequence;
    avgce-online     all N = 4 sources run for every sequence (AvgCE weights).
Methods take turns step by step, so a slow moment of the machine hits them alike. The ideal
ratios come from the parts timed alone: t_sft / (t_sft + k * t_source) with t_source one source
forward over the whole batch (k = 2 for the selector, N = 4 for avgce); "of ideal" is the
measured ratio over the ideal one, and "cost per source" is (t_step - t_sft) / (k * t_source):
what a source adds to the step (its forward, its top-K, the fused target, the KL) in units of
its plain forward. Writes `report.json` and `report.md` (what is printed, after its command,
commit and machine) under `--output`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

from fusion.utils.io import atomic_write_json

METHODS = ("sft", "selector-cached", "selector-online", "avgce-online")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fusion.bench throughput", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per method (after 2 warm-up steps)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--hidden_size", type=int, default=64, help="of the student and the sources (the default: the zoo's tiny models)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--output", default="checkpoints/bench/throughput", help="directory of report.json and report.md")
    arguments = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(arguments)

    from fusion.bench._quality_report import printed_report

    with printed_report("python -m fusion.bench throughput", arguments, "Training speed against plain SFT") as report:
        report["output"] = args.output
        import datasets

        from fusion.bench import _synthetic as syn

        datasets.disable_progress_bars()
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as root:
            architecture = syn.Architecture(
                family="qwen2", hidden_size=args.hidden_size, num_layers=args.layers, num_heads=4, intermediate_size=4 * args.hidden_size
            )
            paths = syn.make_setup(root, args.vocab, rows=args.batch_size * 4, architecture=architecture)
            data = syn.data_module(paths, args.batch_size)
            cache_dir = os.path.join(root, "cache")
            modules = {
                "sft": syn.fusion_module(paths, "none"),
                "selector-cached": syn.fusion_module(paths, "selector", top_k=2, source_mode="cached", cache_dir=cache_dir),
                "selector-online": syn.fusion_module(paths, "selector", top_k=2, cache_dir=cache_dir),
                "avgce-online": syn.fusion_module(paths, "avgce"),
            }
            syn.write_cache(modules["selector-online"], data)
            modules["selector-cached"].attach_cache(data)
            for name, module in modules.items():
                module.load_state_dict(modules["sft"].state_dict(), strict=False)  # the same student start
            optimizers = {name: syn.optimizer_for(m) for name, m in modules.items()}
            batches = list(data.train_dataloader())
            source = modules["avgce-online"].pool.models[0]
            seconds = {name: 0.0 for name in METHODS}
            source_seconds = 0.0
            for step in range(args.steps + 2):
                batch = batches[step % len(batches)]
                for name in METHODS:
                    started = time.perf_counter()
                    syn.train_step(modules[name], batch, optimizers[name])
                    if step >= 2:
                        seconds[name] += time.perf_counter() - started
                # The part alone, in the same turn: one source's plain forward over the whole batch.
                started = time.perf_counter()
                with torch.no_grad():
                    source(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                if step >= 2:
                    source_seconds += time.perf_counter() - started
        per_step = {name: s / args.steps for name, s in seconds.items()}
        t_sft, t_source = per_step["sft"], source_seconds / args.steps
        ideal = {"selector-online": t_sft / (t_sft + 2 * t_source), "avgce-online": t_sft / (t_sft + 4 * t_source)}
        print(
            f"\nvocabulary {args.vocab}, batch {args.batch_size}, hidden size {args.hidden_size}, {args.layers} layers, "
            f"{args.steps} timed steps per method, N = 4, k = 2, K = 10"
        )
        ideal["selector-cached"] = 1.0
        runs = {"selector-online": 2, "avgce-online": 4}  # sources run per sequence
        # What one source costs inside the step, as a multiple of its forward timed alone.
        per_source = {name: (per_step[name] - t_sft) / (runs[name] * t_source) for name in runs}
        print("| method | steps/s | ratio to sft | ideal ratio | of ideal | cost per source / its forward |")
        print("|---|---|---|---|---|---|")
        for name in METHODS:
            ratio = t_sft / per_step[name]
            ideal_cells = f"{ideal[name]:.2f} | {ratio / ideal[name]:.2f}" if name in ideal else "- | -"
            source_cell = f"{per_source[name]:.2f}" if name in per_source else "-"
            print(f"| {name} | {1 / per_step[name]:.2f} | {ratio:.2f} | {ideal_cells} | {source_cell} |")
        print(
            f"\nselector-online is {per_step['avgce-online'] / per_step['selector-online']:.2f}x faster than avgce-online "
            f"(ideal {(t_sft + 4 * t_source) / (t_sft + 2 * t_source):.2f}x); one source forward {t_source * 1000:.0f} ms, the SFT step {t_sft * 1000:.0f} ms"
        )
        results = {
            "provenance": report["provenance"],
            "vocab": args.vocab,
            "batch_size": args.batch_size,
            "hidden_size": args.hidden_size,
            "layers": args.layers,
            "steps": args.steps,
            "seconds_per_step": per_step,
            "source_forward_seconds": t_source,
            "ratio_to_sft": {n: t_sft / per_step[n] for n in METHODS},
            "ideal_ratio": ideal,
            "source_cost_over_forward": per_source,
        }
        atomic_write_json(os.path.join(args.output, "report.json"), results)


if __name__ == "__main__":
    main()
