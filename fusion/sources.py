"""Frozen source LLMs: loading by path or hub name, vocabulary checks, and running only the
sources each sequence selected.
"""

from __future__ import annotations

import os
import re

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from fusion.data import IGNORE_INDEX
from fusion.losses import sequence_ce, target_logprobs
from fusion.tokenizer import load_tokenizer

_HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(path: str, key: str) -> str:
    """A local model directory, or a hub name; anything else fails naming the config key."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"{key}: {path!r} is a directory but not a model (no config.json in it)")
        return path
    if os.path.exists(path) or not _HUB_NAME.match(path):
        raise FileNotFoundError(f"{key}: {path!r} does not exist (expected a model directory or a hub name like org/model)")
    return path


def source_name(path: str) -> str:
    return os.path.basename(os.path.normpath(path))


def check_same_vocabulary(student: PreTrainedTokenizerBase, source: PreTrainedTokenizerBase, key: str) -> None:
    """Sources must share the student's tokenizer until cross-tokenizer alignment is configured."""
    if student.get_vocab() != source.get_vocab():
        only_source = len(set(source.get_vocab()) - set(student.get_vocab()))
        raise ValueError(
            f"{key}: the source's vocabulary ({len(source)} tokens) differs from the student's ({len(student)} "
            f"tokens, {only_source} source tokens not in the student's); sources must use the student's tokenizer"
        )


def load_frozen(path: str, dtype: str, trust_remote_code: bool):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=True)
    model.eval().requires_grad_(False)
    return model


class SourcePool:
    """N frozen sources, kept out of the LightningModule's state dict (checkpoints never hold them)."""

    def __init__(self, paths: list[str], student_tokenizer: PreTrainedTokenizerBase, dtype: str = "float32", trust_remote_code: bool = False):
        self.names = [source_name(p) for p in paths]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"model.sources: source directory names must be unique, got {self.names}")
        self.vocab_size = len(student_tokenizer)
        self.models = []
        for index, path in enumerate(paths):
            key = f"model.sources[{index}]"
            path = resolve_model_path(path, key)
            check_same_vocabulary(student_tokenizer, load_tokenizer(path, trust_remote_code), key)
            model = load_frozen(path, dtype, trust_remote_code)
            if model.get_output_embeddings().weight.shape[0] < self.vocab_size:
                raise ValueError(f"{key}: the model has {model.get_output_embeddings().weight.shape[0]} output rows, fewer than the {self.vocab_size} tokens of its tokenizer")
            self.models.append(model)
        self.device = torch.device("cpu")

    def __len__(self) -> int:
        return len(self.models)

    def to(self, device: torch.device) -> "SourcePool":
        if device != self.device:
            self.models = [m.to(device) for m in self.models]
            self.device = device
        return self

    @torch.no_grad()
    def run(self, selected: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
        """Run each source only on the sequences that selected it.

        selected [B, k] source indices -> probs [B, k, T, V] at `temperature`, ce [B, k] at T = 1,
        and valid [B, k]: False where a source's logits were not finite (NaN or inf) on a trained
        position; such a pair has zero probs and zero ce and must not be used.
        Output rows past the tokenizer's length (padded embeddings) are dropped.
        """
        batch, k = selected.shape
        probs = torch.zeros(batch, k, input_ids.shape[1], self.vocab_size, device=input_ids.device)
        ce = torch.zeros(batch, k, device=input_ids.device)
        valid = torch.ones(batch, k, dtype=torch.bool, device=input_ids.device)
        for index, model in enumerate(self.models):
            rows, slots = (selected == index).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            logits = model(input_ids=input_ids[rows], attention_mask=attention_mask[rows]).logits[..., : self.vocab_size].float()
            trained = targets[rows] != IGNORE_INDEX  # [R, T]
            is_finite = torch.isfinite(logits)  # [R, T, V]
            finite = (is_finite.all(-1) | ~trained).all(-1)  # [R]: usable where it is trained
            logits = torch.where(is_finite, logits, torch.zeros_like(logits))
            ce[rows, slots] = torch.where(finite, sequence_ce(target_logprobs(logits, targets[rows]), targets[rows]), 0.0)
            probs[rows, slots] = torch.softmax(logits / temperature, dim=-1) * finite[:, None, None]
            valid[rows, slots] = finite
        return probs, ce, valid
