"""lm-evaluation-harness on an exported student scores the test split as `fusion.train test` does."""

from __future__ import annotations

import json
import os
import shlex

import pytest
import yaml
from transformers import AutoTokenizer

from fusion import eval_harness, export
from fusion.data.datamodule import FusionDataModule
from fusion.data.tokenizer import load_tokenizer
from fusion.stages.evaluation import greedy_answers
from fusion.stages.fusion import FusionDistillModule
from fusion.train import main

TEST_SIZE = 25  # rows per domain


def _harness_command(capsys, argv: list[str]) -> list[str]:
    capsys.readouterr()
    eval_harness.main(argv)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("lm_eval --model hf --model_args ")
    return shlex.split(lines[-1])


@pytest.mark.slow
def test_lm_eval_matches_fusion_test(tiny_zoo, write_config, tmp_path, capsys):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    # A student that has learnt a little: the zoo's briefly trained spell_backward specialist (the
    # random base answers "======" to every prompt), fine-tuned 8 steps with LoRA on both domains.
    config = write_config(fusion="none", learning_rate=0.02, student=os.path.join(tiny_zoo, "spell"))
    runs = tmp_path / "runs"
    size = ["--data.test_size", str(TEST_SIZE)]
    main(["fit", "--config", config, "--trainer.max_steps", "8", "--trainer.limit_val_batches", "0"])
    ckpt = str(runs / "run" / "version_0" / "checkpoints" / "last.ckpt")
    main(["test", "--config", config, "--ckpt_path", ckpt, *size])
    with open(runs / "run" / "version_1" / "metrics.json") as f:
        fusion_acc = json.load(f)["acc"]

    # The tiny student is a Qwen2 with a character tokenizer: AutoTokenizer would read its
    # directory with Qwen2's own tokenizer class and drop the spaces, so the export carries it alone too.
    exported = export.export(ckpt, str(tmp_path / "export"))
    tokenizer = load_tokenizer(exported)
    probe = "backward cat="
    assert (
        AutoTokenizer.from_pretrained(exported)(probe, add_special_tokens=False)["input_ids"]
        != tokenizer(probe, add_special_tokens=False)["input_ids"]
    )
    assert (
        AutoTokenizer.from_pretrained(os.path.join(exported, "tokenizer"))(probe, add_special_tokens=False)["input_ids"]
        == tokenizer(probe, add_special_tokens=False)["input_ids"]
    )

    task_dir = str(tmp_path / "lm_eval_task")
    command = _harness_command(capsys, ["--output_dir", task_dir, "--export", exported, "--config", config, "--ckpt_path", ckpt, *size])
    model_args = command[command.index("--model_args") + 1]
    assert model_args == f"pretrained={exported},tokenizer={exported}/tokenizer,add_bos_token=True"
    with open(os.path.join(task_dir, "fusion_suite_chain_sum.yaml")) as f:
        task = yaml.load(f, Loader=yaml.BaseLoader)  # BaseLoader: leaves the !function tag alone
    assert task["generation_kwargs"]["max_gen_toks"] == "6"  # the tiny config's model.max_new_tokens

    results = simple_evaluate(
        model="hf",
        model_args=model_args + ",device=cpu",
        tasks=["fusion_suite"],
        batch_size=8,
        task_manager=TaskManager(include_path=task_dir, include_defaults=False),
        log_samples=True,
    )
    lm_eval_acc = {d: results["results"][f"fusion_suite_{d}"]["acc,none"] for d in fusion_acc}
    for domain in fusion_acc:
        assert lm_eval_acc[domain] == pytest.approx(fusion_acc[domain], abs=1.0 / TEST_SIZE + 1e-6), (domain, lm_eval_acc, fusion_acc)
    assert results["results"]["fusion_suite"]["acc,none"] == pytest.approx(sum(lm_eval_acc.values()) / len(lm_eval_acc))

    # Row by row: the exact prompts fusion tests, each answered as fusion's greedy evaluation answers it.
    samples = {s["doc"]["prompt"]: s for task in results["samples"].values() for s in task}
    module = FusionDistillModule.load_from_checkpoint(ckpt, weights_only=True)
    data = FusionDataModule(tokenizer=module.hparams.student, **{**yaml.safe_load(open(config))["data"], "test_size": TEST_SIZE})
    data.setup("test")
    ours: dict[str, str] = {}
    for batch in data.test_dataloader():
        answers = greedy_answers(module.student, module.tokenizer, batch["prompt_ids"], batch["prompt_attention_mask"], 6)
        ours.update({row["prompt"]: answer for row, answer in zip(batch["rows"], answers)})
    assert set(samples) == set(ours) and len(ours) == 2 * TEST_SIZE
    differing = [p for p in ours if samples[p]["filtered_resps"][0] != ours[p]]
    assert len(differing) <= 1, [(p, ours[p], samples[p]["filtered_resps"][0]) for p in differing]
    # Not a degenerate student: its answers depend on the prompt (here mostly their length).
    assert len({answer.strip() for answer in ours.values()}) >= 5, sorted(set(ours.values()))


def test_process_results_is_fusions_scorer(tmp_path):
    """utils.py scores with fusion's scorer: the gold answer (surrounding whitespace aside) is 1, a near miss 0."""
    import importlib.util

    rows = [
        {"prompt": "3 + 4=", "response": "7", "domain": "chain_sum", "metadata": json.dumps({"expression": "3 + 4"})},
        {"prompt": "backward cat=", "response": "tac", "domain": "spell_backward", "metadata": json.dumps({"word": "cat"})},
    ]
    names = eval_harness.write_task(rows, str(tmp_path / "task"), max_new_tokens=5)
    assert names == {"chain_sum": "fusion_suite_chain_sum", "spell_backward": "fusion_suite_spell_backward"}
    spec = importlib.util.spec_from_file_location("task_utils", tmp_path / "task" / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    assert utils.process_results(rows[0], [" 7"]) == {"acc": 1.0}
    assert utils.process_results(rows[0], ["17"]) == {"acc": 0.0}
    assert utils.process_results(rows[1], ["tac "]) == {"acc": 1.0}
    assert utils.process_results(rows[1], ["cat"]) == {"acc": 0.0}
    with open(tmp_path / "task" / "fusion_suite_spell_backward.jsonl") as f:
        assert [json.loads(line) for line in f] == [rows[1]]


def test_truncated_test_rows_are_refused(tiny_zoo):
    """fusion.train test answers a prompt cut to make room for its answer; the task refuses rather than differ."""
    data = {
        "tokenizer": os.path.join(tiny_zoo, "student"),
        "domains": ["spell_backward"],
        "train_size": 4,
        "val_size": 2,
        "test_size": 8,
        "max_length": 12,
    }
    with pytest.raises(ValueError, match=r"8 test rows \(spell_backward\).*--data.max_length (1[89]|2[0-2]) "):
        eval_harness.test_rows(data)
    kept = eval_harness.test_rows({**data, "max_length": 20, "overlong": "drop"})  # bos, prompt, answer, eos: one token a character
    assert 0 < len(kept) < 8 and all(len(r["prompt"]) + len(r["response"]) + 2 <= 20 for r in kept)


def test_export_without_tokenizer_copy_is_refused(tmp_path, tiny_zoo):
    """An export whose tokenizer AutoTokenizer misreads, without the copy beside it, gets a clear error."""
    import shutil

    shutil.copytree(os.path.join(tiny_zoo, "student"), tmp_path / "old_export")
    with pytest.raises(ValueError, match="export it again"):
        eval_harness.lm_eval_model_args(str(tmp_path / "old_export"))
    with pytest.raises(ValueError, match="cannot hold a path with ','"):
        eval_harness.lm_eval_model_args(str(tmp_path / "a,b"))
