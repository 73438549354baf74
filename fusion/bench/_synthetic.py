"""A synthetic fusion setup of any vocabulary size, for the cost benchmarks.

Untrained tiny models are as expensive as trained ones, so memory and speed are measured on a
student and N sources built from config with a word-level tokenizer of `vocab_size` tokens,
and on random token sequences; the steps run through the real `FusionDistillModule`.
"""

from __future__ import annotations

import json
import os
import random

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from fusion.data.datamodule import FusionDataModule
from fusion.stages.fusion import FusionDistillModule
from fusion.utils.io import atomic_open
from fusion.zoo import Architecture, build_model

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Whitespace-separated words w4 ... w{V-1}, plus the four special tokens: V tokens in all."""
    vocab = {token: i for i, token in enumerate(SPECIALS)} | {f"w{i}": i for i in range(len(SPECIALS), vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


def make_setup(
    root: str,
    vocab_size: int,
    num_sources: int = 4,
    architecture: Architecture | None = None,
    rows: int = 64,
    prompt_words: int = 8,
    response_words: int = 40,
    seed: int = 0,
) -> dict:
    """Student, sources and a JSONL data set under `root`; returns their paths."""
    architecture = architecture or Architecture(family="qwen2", hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256)
    tokenizer = word_tokenizer(vocab_size)
    paths = {"student": os.path.join(root, "student"), "sources": [os.path.join(root, f"source{i}") for i in range(num_sources)]}
    for index, path in enumerate([paths["student"], *paths["sources"]]):
        if not os.path.isfile(os.path.join(path, "config.json")):
            build_model(architecture, tokenizer, seed + index).save_pretrained(path, safe_serialization=True)
            tokenizer.save_pretrained(path)
    generator = random.Random(seed)

    def words(n: int) -> str:
        return " ".join(f"w{generator.randrange(len(SPECIALS), vocab_size)}" for _ in range(n))

    paths["data"] = os.path.join(root, "data")
    os.makedirs(paths["data"], exist_ok=True)
    for split, count in (("train", rows), ("val", 4), ("test", 4)):
        with atomic_open(os.path.join(paths["data"], f"{split}.jsonl")) as f:
            for _ in range(count):
                f.write(json.dumps({"prompt": words(prompt_words), "response": words(response_words)}) + "\n")
    return paths


def data_module(paths: dict, batch_size: int) -> FusionDataModule:
    data = FusionDataModule(
        tokenizer=paths["student"],
        dataset=paths["data"],
        domain_column=None,
        max_length=128,
        batch_size=batch_size,
        eval_batch_size=batch_size,
    )
    data.setup("fit")
    return data


def fusion_module(paths: dict, fusion: str, top_k: int = 2, **settings) -> FusionDistillModule:
    """A module ready for hand-driven steps: Lightning's logging is switched off."""
    sources = paths["sources"] if fusion != "none" else []
    module = FusionDistillModule(student=paths["student"], sources=sources, fusion=fusion, top_k=top_k, **settings)
    module.log = module.log_dict = lambda *args, **kwargs: None
    return module


def write_cache(module: FusionDistillModule, data: FusionDataModule) -> None:
    """`predict` through a Lightning Trainer, exactly as the CLI writes the cache."""
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.predict(module, datamodule=data, return_predictions=False)


def optimizer_for(module: FusionDistillModule) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)


def train_step(module: FusionDistillModule, batch: dict, optimizer: torch.optim.Optimizer) -> float:
    module.train()
    loss = module.training_step(batch, 0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())
