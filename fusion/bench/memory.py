"""Peak memory of one fused training step next to plain SFT on the same student and batch.

    python -m fusion.bench memory [--vocab 1000 32000 50000] [--batch_size 16]

For every vocabulary size: a student and N = 4 sources (tiny Qwen2 built from config), and one
training step (forward, loss, backward, optimizer step) of
    sft              plain SFT (`fusion: none`), the reference;
    selector-online  the selector, k = 2 of N = 4 sources run in the step;
    selector-cached  the selector reading the sources' top-K from the offline cache;
    dense-reference  what a dense fused target would add: the selected sources' full
                     [B, k, T, V] probabilities (the layout the sparse path replaces), for scale.
Each measurement runs in a fresh process. On CPU the step's peak is the peak resident memory
during the step (VmHWM, reset through /proc/self/clear_refs) above the resident memory before
it, with glibc's mmap threshold fixed so that large tensors are returned to the system when
freed; on a GPU it is `torch.cuda.max_memory_allocated` above the allocation before the step.
Writes `report.json` and `report.md` (what is printed, after its command, commit and machine)
under `--output`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile

from fusion.utils.io import atomic_write_json

METHODS = ("sft", "selector-online", "selector-cached", "dense-reference")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(root: str, vocab: int, method: str, batch_size: int) -> float:
    """MiB above the state before one step (runs in the child process)."""
    import torch

    from fusion.bench import _synthetic as syn

    torch.manual_seed(0)
    paths = syn.make_setup(root, vocab)
    data = syn.data_module(paths, batch_size)
    fusion = "none" if method == "sft" else "selector"
    settings = {"source_top_k": 10}
    if method == "selector-cached":
        settings |= {"source_mode": "cached", "cache_dir": os.path.join(root, "cache")}
    module = syn.fusion_module(paths, fusion, top_k=2, **settings)
    if method == "selector-cached":
        module.attach_cache(data)
    batch = next(iter(data.train_dataloader()))
    optimizer = syn.optimizer_for(module)
    extra = None
    # Every model resident before the step: the sources load where they run (on first use of
    # the pool), and safetensors weights are paged in when first read; neither is the step's.
    models = [module.student, *(module.pool.models if method == "selector-online" else [])]
    with torch.no_grad():
        for model in models:
            for parameter in model.parameters():
                parameter.sum()
    gc.collect()
    cuda = torch.cuda.is_available()
    if cuda:
        module.cuda()
        batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        handle = os.open("/proc/self/clear_refs", os.O_WRONLY)  # a kernel control, not a file
        os.write(handle, b"5")  # reset the peak resident set size to the current one
        os.close(handle)
        before = _status_kib("VmRSS") * 1024
    if method == "dense-reference":  # the dense target a non-sparse implementation would hold
        length = batch["input_ids"].shape[1]
        extra = torch.rand(batch_size, 2, length, vocab, device=batch["input_ids"].device)
    syn.train_step(module, batch, optimizer)
    del extra
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_kib("VmHWM") * 1024
    return (peak - before) / 2**20


def _child(args) -> None:
    print(json.dumps({"mib": measure(args.root, args.vocab, args.method, args.batch_size)}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fusion.bench memory", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", type=int, nargs="+", default=[1000, 32000, 50000])
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--output", default="checkpoints/bench/memory", help="directory of report.json and report.md")
    parser.add_argument("--child", nargs=2, metavar=("ROOT", "METHOD"), help=argparse.SUPPRESS)
    arguments = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(arguments)
    if args.child:
        args.root, args.method = args.child
        args.vocab = args.vocab[0]
        return _child(args)

    from fusion.bench._quality_report import printed_report

    with printed_report("python -m fusion.bench memory", arguments, "Peak memory of a training step") as report:
        report["output"] = args.output
        from fusion.bench import _synthetic as syn

        results = {}
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        with tempfile.TemporaryDirectory() as root:
            for vocab in args.vocab:
                setup = os.path.join(root, f"v{vocab}")
                paths = syn.make_setup(setup, vocab)  # built once, then the cache is written once
                module = syn.fusion_module(paths, "selector", source_top_k=10, cache_dir=os.path.join(setup, "cache"))
                syn.write_cache(module, syn.data_module(paths, args.batch_size))
                del module
                results[vocab] = {}
                for method in METHODS:
                    command = [
                        sys.executable,
                        "-m",
                        "fusion.bench",
                        "memory",
                        "--vocab",
                        str(vocab),
                        "--batch_size",
                        str(args.batch_size),
                        "--child",
                        setup,
                        method,
                    ]
                    out = subprocess.run(command, env=env, capture_output=True, text=True)
                    if out.returncode != 0:
                        raise RuntimeError(f"memory bench child failed ({vocab}, {method}):\n{out.stderr[-3000:]}")
                    results[vocab][method] = json.loads(out.stdout.strip().splitlines()[-1])["mib"]
                    print(f"vocab {vocab:>6}  {method:<16} {results[vocab][method]:8.1f} MiB", flush=True)
        lines = [
            "| vocabulary | " + " | ".join(f"{m} MiB" for m in METHODS) + " | online / sft | cached / sft |",
            "|---" * (len(METHODS) + 3) + "|",
        ]
        for vocab, row in results.items():
            cells = " | ".join(f"{row[m]:.0f}" for m in METHODS)
            lines.append(f"| {vocab} | {cells} | {row['selector-online'] / row['sft']:.2f} | {row['selector-cached'] / row['sft']:.2f} |")
        print(f"\nPeak memory of one training step above the loaded models (N = 4, k = 2, K = 10, batch {args.batch_size}):")
        print("\n".join(lines))
        atomic_write_json(
            os.path.join(args.output, "report.json"), {"provenance": report["provenance"], "batch_size": args.batch_size, "mib": results}
        )


if __name__ == "__main__":
    main()
