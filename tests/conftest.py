"""Shared fixtures: a tiny zoo built from config in a temporary directory (nothing downloaded)."""

from __future__ import annotations

import math
import os

import pytest
import torch
import yaml

from fusion.zoo import Architecture, SourceRecipe, build_zoo

TINY = Architecture(family="qwen2", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
DOMAINS = ["spell_backward", "chain_sum"]


def tiny_zoo_recipe(root: str) -> dict:
    """`build_zoo` arguments of the tiny zoo: a char-level student and three sources with three
    tokenizers: two briefly trained specialists (Qwen2 with the student's char tokenizer; GPT-2
    with a 300-token BPE) and a random Llama with the real GPT-2 tokenizer (50257 tokens in 50304
    output rows)."""
    return dict(
        sources=[
            SourceRecipe("spell", domains=["spell_backward"], architecture=TINY, steps=30, learning_rate=1e-2),
            SourceRecipe(
                "sum",
                domains=["chain_sum"],
                architecture=Architecture(family="gpt2", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
                steps=30,
                learning_rate=1e-2,
                tokenizer="bpe-300",
            ),
            SourceRecipe(
                "noise",
                kind="random",
                architecture=Architecture(family="llama", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, pad_vocab_to=64),
                tokenizer="gpt2",
            ),
        ],
        student=SourceRecipe("student", kind="random", architecture=TINY),
        output_dir=root,
        domains=DOMAINS,
        examples_per_domain=300,
        batch_size=16,
        test_size=8,
        workers=1,
    )


def pytest_collection_modifyitems(items) -> None:
    """A test that needs the tiny zoo is slow: the session builds it first (four small models
    trained for a few steps, tens of seconds on 2 cores). `pytest -m "not slow"` leaves those out,
    with the tests marked slow by hand (runs through the CLI or the Trainer, longer trainings)."""
    for item in items:
        if "tiny_zoo" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def fusion_cache(tmp_path_factory) -> str:
    """The per-user cache (vocabulary maps) in a temporary directory for the whole session, so the
    suite writes nothing into the repository or the user's cache; subprocesses inherit it."""
    root = str(tmp_path_factory.mktemp("fusion_cache"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FUSION_CACHE", root)
        yield root


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory) -> str:
    torch.set_num_threads(2)
    root = str(tmp_path_factory.mktemp("zoo"))
    build_zoo(**tiny_zoo_recipe(root))
    return root


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory) -> str:
    """The tiny zoo's student alone (a random Qwen2 with the char tokenizer), built in a second:
    for the tests that load a student only to see a setting refused, which need no zoo."""
    from fusion.data.tokenizer import build_char_tokenizer
    from fusion.zoo import build_model

    path = str(tmp_path_factory.mktemp("student"))
    tokenizer = build_char_tokenizer()
    build_model(TINY, tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_config(zoo: str, run_dir: str, **model) -> dict:
    """A complete fusion.train config for a few steps on the tiny zoo."""
    return {
        "seed_everything": 0,
        "trainer": {
            "max_steps": 4,
            "accelerator": "cpu",
            "devices": 1,
            "val_check_interval": 2,
            "check_val_every_n_epoch": None,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": run_dir,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": run_dir, "name": "run"}},
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True, "save_top_k": 0}}],
        },
        "model": {
            "student": os.path.join(zoo, "student"),
            "sources": [os.path.join(zoo, name) for name in ("spell", "sum", "noise")],
            "fusion": "selector",
            "top_k": 1,
            "max_new_tokens": 6,
            "exploration_steps": 2,
            "oracle": {"spell_backward": "spell", "chain_sum": "sum"},
            **model,
        },
        "data": {"domains": DOMAINS, "train_size": 16, "val_size": 4, "test_size": 4, "batch_size": 8, "eval_batch_size": 8},
    }


@pytest.fixture
def write_config(tiny_zoo, tmp_path):
    def write(**model) -> str:
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(tiny_config(tiny_zoo, str(tmp_path / "runs"), **model)))
        return str(path)

    return write


def reference_test_metrics(model, tokenizer, data: dict, max_new_tokens: int) -> dict:
    """Accuracy per domain, its mean and the response perplexity of `model` on the test split of
    the `data` settings, computed here (the model's forward, greedy decoding, the task scorers),
    apart from Lightning's test loop, to hold `metrics.json` against."""
    from fusion.data import IGNORE_INDEX
    from fusion.data.datamodule import FusionDataModule
    from fusion.objectives.losses import target_logprobs
    from fusion.stages.evaluation import correct, greedy_answers

    module = FusionDataModule(tokenizer=tokenizer.name_or_path, **data)
    module._tokenizer = tokenizer
    hits, nll, tokens = {}, 0.0, 0
    model.eval()
    with torch.no_grad():
        for batch in module.test_dataloader():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[..., : len(tokenizer)]
            mask = batch["targets"] != IGNORE_INDEX
            nll -= float((target_logprobs(logits, batch["targets"]) * mask).sum())
            tokens += int(mask.sum())
            answers = greedy_answers(model, tokenizer, batch["prompt_ids"], batch["prompt_attention_mask"], max_new_tokens)
            for row, ok in zip(batch["rows"], correct(answers, batch["rows"])):
                hits.setdefault(row["domain"], []).append(ok)
    acc = {domain: sum(oks) / len(oks) for domain, oks in hits.items()}
    return {
        "acc": acc,
        "acc_mean": sum(acc.values()) / len(acc),
        "sequences": {d: len(oks) for d, oks in hits.items()},
        "perplexity": math.exp(nll / tokens),
    }
