"""The test split of `fusion.train test` as a local lm-evaluation-harness task, scored as fusion scores it.

    python -m fusion.eval_harness --output_dir checkpoints/lm_eval/quickstart \\
        --export checkpoints/export/selector --config configs/quickstart.yaml
    lm_eval --model hf --model_args <printed> --include_path checkpoints/lm_eval/quickstart \\
        --tasks fusion_suite --batch_size 32

Everything after this tool's own options is read as `fusion.train test` reads its arguments
(`--config`, overrides such as `--data.test_size 200`, `--ckpt_path`, whose model
hyperparameters then apply), so the task holds exactly the rows that command scores: the
embedded suite's test split from the same domains, sizes and seed, or the test split of your own
data, in the same order; a row that `data.overlong: drop` drops is left out, and a row that
`data.overlong: truncate` would cut is an error (lm-eval cuts prompts at another length).

`--output_dir` receives one task per domain (`<name>_<domain>`: a JSON-lines file and a YAML)
and a group `<name>` (default `fusion_suite`) whose `acc` is the unweighted mean over domains,
as `acc_mean` in `metrics.json`. Each task is what `fusion.train test` does: the prompt string
alone (no chat template, no few-shot examples), greedy decoding of at most `model.max_new_tokens`
tokens, stopped by eos only, special tokens dropped, and the answer judged by `fusion.data.tasks.is_correct`
(the domain's reasoning-gym scorer on the stripped answer; exact match outside the suite)
through `utils.py`, so lm-eval's process must be able to import `fusion`. The data files are
named by absolute path; nothing is downloaded.

With `--export` (a `fusion.export` directory) the tool prints lm-eval's `--model_args` for it:
`tokenizer=<export>/tokenizer` where `AutoTokenizer` would read the export's tokenizer otherwise
(see `fusion.export`), and `add_bos_token=True` where the tokenizer has a bos token, since
`fusion` puts one before every prompt (`fusion.data.datamodule.encode`). It checks first that lm-eval will
feed the model every prompt as fusion does: the same token ids, and whole (lm-eval keeps only the
last `context length - max_new_tokens` tokens of a prompt). Run lm_eval without
`--apply_chat_template` and `--num_fewshot`: fusion feeds the prompt alone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import warnings
from typing import Any

import yaml

from fusion.data.datamodule import FusionDataModule, encode
from fusion.data.tokenizer import load_tokenizer
from fusion.export import TOKENIZER_SUBDIR, auto_tokenizer_matches
from fusion.utils.io import atomic_directory, atomic_write_text

DEFAULT_NAME = "fusion_suite"
FIELDS = ("prompt", "response", "domain", "metadata")

UTILS = '''"""Written by fusion.eval_harness: an answer is scored by fusion's own scorer, as `fusion.train test` scores it."""

from fusion.data import tasks


def process_results(doc, results):
    return {"acc": float(tasks.is_correct(doc["domain"], results[0], doc))}
'''


def parse_test_command(args: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The data and model init arguments `python -m fusion.train test <args>` runs with (config files,
    overrides, and with `--ckpt_path` the checkpoint's model hyperparameters); nothing is built or run."""
    from fusion.train import FusionCLI, main

    class Parsed(FusionCLI):
        def instantiate_classes(self) -> None:
            pass

        def _run_subcommand(self, subcommand: str) -> None:
            pass

    config = main(["test", *args], cli=Parsed).config["test"]
    model = config["model"].as_dict()
    return config["data"].as_dict(), {**(model.get("init_args") or {}), **(model.get("dict_kwargs") or {})}


def test_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows `fusion.train test` scores with this data config, in its order."""
    module = FusionDataModule(**data)
    h = module.hparams
    rows, cut = [], []
    for row in module.load()["test"]:
        if encode(module.tokenizer, row["prompt"], row["response"], h.max_length)["truncated"]:
            cut.append(row)
            if h.overlong == "drop":
                continue
        rows.append(row)
    if cut and h.overlong == "truncate":
        # fusion.data.datamodule.encode fits prompt + response + eos into max_length, so the prompt it greedily
        # answers loses its start (bos included); an lm-eval task feeds every prompt whole.
        needed = max(len(encode(module.tokenizer, r["prompt"], r["response"], 10**9)["input_ids"]) for r in cut)
        raise ValueError(
            f"{len(cut)} test rows ({', '.join(sorted({r['domain'] for r in cut}))}) are longer than "
            f"data.max_length={h.max_length} with their answer, so fusion.train test answers their prompt cut from "
            f"the left (data.overlong: truncate), which an lm-eval task cannot reproduce; run both this tool and "
            f"fusion.train test with --data.max_length {needed} (every row whole) or --data.overlong drop"
        )
    if not rows:
        raise ValueError(f"every test row is longer than data.max_length={h.max_length} and data.overlong: drop drops it")
    return rows


def _task_names(domains: list[str], name: str) -> dict[str, str]:
    names: dict[str, str] = {}
    for domain in domains:
        base = f"{name}_{re.sub(r'[^0-9A-Za-z_]+', '_', domain)}"
        names[domain] = base if base not in names.values() else f"{base}_{len(names)}"
    return names


def write_task(rows: list[dict[str, Any]], output_dir: str, max_new_tokens: int, name: str = DEFAULT_NAME) -> dict[str, str]:
    """Write `rows` as lm-eval tasks under `output_dir` (replaced whole); returns domain -> task name."""
    if not re.fullmatch(r"[A-Za-z][0-9A-Za-z_]*", name):
        raise ValueError(f"--name must be letters, digits and underscores, starting with a letter, got {name!r}")
    if max_new_tokens < 1:
        raise ValueError(f"model.max_new_tokens must be at least 1, got {max_new_tokens}")
    output_dir = os.path.abspath(output_dir)
    domains = list(dict.fromkeys(row["domain"] for row in rows))  # first-seen order, as the split has them
    names = _task_names(domains, name)
    with atomic_directory(output_dir) as temporary:
        for domain, task in names.items():
            lines = [json.dumps({field: row.get(field) for field in FIELDS}) for row in rows if row["domain"] == domain]
            atomic_write_text(os.path.join(temporary, f"{task}.jsonl"), "\n".join(lines) + "\n")
            config = {
                "task": task,
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": os.path.join(output_dir, f"{task}.jsonl")}},
                "test_split": "test",
                "output_type": "generate_until",
                "num_fewshot": 0,
                "doc_to_text": "prompt",  # a column: the prompt string as fusion feeds it, untouched
                "doc_to_target": "response",
                # Greedy, at most model.max_new_tokens tokens, stopped by eos (which lm-eval always adds).
                "generation_kwargs": {"until": [], "do_sample": False, "temperature": 0.0, "max_gen_toks": max_new_tokens},
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
                "metadata": {"version": 1.0, "domain": domain, "rows": len(lines)},
            }
            text = yaml.safe_dump(config, sort_keys=False) + "process_results: !function utils.process_results\n"
            atomic_write_text(os.path.join(temporary, f"{task}.yaml"), text)
        group = {
            "group": name,
            "task": list(names.values()),
            # fusion's acc_mean: every domain weighs the same, whatever its number of rows
            "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": False}],
            "metadata": {"version": 1.0},
        }
        atomic_write_text(os.path.join(temporary, f"{name}.yaml"), yaml.safe_dump(group, sort_keys=False))
        atomic_write_text(os.path.join(temporary, "utils.py"), UTILS)
    return names


def lm_eval_model_args(export_dir: str) -> dict[str, Any]:
    """lm-eval's HF model arguments that read a `fusion.export` directory as fusion does."""
    if re.search(r"[,=]", export_dir):
        raise ValueError(f"--export {export_dir!r}: lm-eval's --model_args cannot hold a path with ',' or '='")
    if not os.path.isfile(os.path.join(export_dir, "config.json")):
        raise FileNotFoundError(
            f"--export {export_dir!r} is not a model directory (no config.json); write one with python -m fusion.export"
        )
    tokenizer = load_tokenizer(export_dir)
    args: dict[str, Any] = {"pretrained": export_dir}
    subdir = os.path.join(export_dir, TOKENIZER_SUBDIR)
    if os.path.isdir(subdir):
        args["tokenizer"] = subdir
    elif not auto_tokenizer_matches(export_dir, tokenizer):
        raise ValueError(
            f"--export {export_dir!r}: AutoTokenizer (which lm-eval uses) does not read its tokenizer as saved, and it "
            f"has no {TOKENIZER_SUBDIR}/ beside it; export it again with python -m fusion.export"
        )
    if tokenizer.bos_token_id is not None:
        args["add_bos_token"] = True
    return args


def check_export(model_args: dict[str, Any], prompts: list[str], max_new_tokens: int) -> None:
    """Raise unless lm-eval, given `model_args`, feeds the model each prompt as `fusion.data.datamodule.encode`
    does, whole: the same token ids, and room for `max_new_tokens` more in the model's context."""
    from transformers import AutoConfig, AutoTokenizer

    path = model_args.get("tokenizer", model_args["pretrained"])
    kwargs = {"add_bos_token": model_args["add_bos_token"]} if "add_bos_token" in model_args else {}
    theirs = AutoTokenizer.from_pretrained(path, **kwargs)
    ours = load_tokenizer(model_args["pretrained"])
    longest = 0
    for prompt in prompts:
        expected = encode(ours, prompt, None, 10**9)["input_ids"]
        got = theirs(prompt, **({"add_special_tokens": kwargs["add_bos_token"]} if kwargs else {}))[
            "input_ids"
        ]  # as lm-eval's HFLM calls it
        if got != expected:
            raise ValueError(f"lm-eval would encode {prompt!r} as {got}, fusion as {expected}: the numbers would not be comparable")
        longest = max(longest, len(expected))
    # lm-eval keeps the last (context length - max_gen_toks) tokens of a prompt; fusion keeps it whole.
    config = AutoConfig.from_pretrained(model_args["pretrained"])
    stops = _generation_eos(model_args["pretrained"]) - {ours.eos_token_id}
    if stops:
        warnings.warn(
            f"{model_args['pretrained']}: generation_config.json also stops at token(s) {sorted(stops)}, where lm-eval stops "
            f"and fusion (which stops at the tokenizer's eos {ours.eos_token_id} only) goes on: an answer that emits one may differ"
        )
    context = next(
        (
            getattr(config, key)
            for key in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length")
            if isinstance(getattr(config, key, None), int)
        ),
        None,
    )
    if context is not None and longest + max_new_tokens > context:
        raise ValueError(
            f"the longest prompt ({longest} tokens) and model.max_new_tokens={max_new_tokens} exceed the model's "
            f"{context} positions: lm-eval would cut the prompt, fusion would not"
        )


def _generation_eos(path: str) -> set[int]:
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:  # no generation_config.json
        return set()
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def format_model_args(model_args: dict[str, Any]) -> str:
    return ",".join(f"{key}={value}" for key, value in model_args.items())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        usage="python -m fusion.eval_harness --output_dir DIR [--export DIR] [--name NAME] --config CONFIG [fusion.train test arguments]",
    )
    parser.add_argument("--output_dir", required=True, help="directory for the task files (replaced whole)")
    parser.add_argument("--export", help="a fusion.export directory: check it and print lm-eval's command for it")
    parser.add_argument("--name", default=DEFAULT_NAME, help=f"the task group's name (default {DEFAULT_NAME}); tasks are NAME_<domain>")
    args, test_args = parser.parse_known_args(argv)
    if not test_args:
        parser.error("pass the arguments `python -m fusion.train test` runs with (at least --config)")
    data, model = parse_test_command(test_args)
    if "max_new_tokens" not in model:
        raise ValueError("the config's model has no max_new_tokens: its greedy budget at test is unknown")
    rows = test_rows(data)
    model_args = "pretrained=<export dir>"
    if args.export:  # checked before anything is written
        resolved = lm_eval_model_args(args.export)
        check_export(resolved, [row["prompt"] for row in rows], model["max_new_tokens"])
        model_args = format_model_args(resolved)
    names = write_task(rows, args.output_dir, model["max_new_tokens"], args.name)
    counts = {domain: sum(row["domain"] == domain for row in rows) for domain in names}
    print(
        f"{args.output_dir}: group {args.name}, {len(rows)} rows ({', '.join(f'{names[d]}: {n}' for d, n in counts.items())}), "
        f"greedy, at most {model['max_new_tokens']} new tokens"
    )
    print(f"lm_eval --model hf --model_args {model_args} --include_path {args.output_dir} --tasks {args.name} --batch_size 32")


if __name__ == "__main__":
    main()
