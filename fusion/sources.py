"""Frozen source LLMs: loading by path or hub name, vocabulary checks, and running only the
sources each sequence selected.
"""

from __future__ import annotations

import math
import os
import re
from typing import NamedTuple

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from fusion.data import IGNORE_INDEX
from fusion.losses import sequence_ce
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
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    model.eval().requires_grad_(False)
    return model


class SourceOutputs(NamedTuple):
    """What the selected sources said about a batch, over the student's vocabulary, sparse.

    ids [B, k, T, K]: each source's top-K student token ids per student position (-1 empty);
    logprobs [B, k, T, K]: their log-probabilities at the distillation temperature;
    ce [B, k]: the source's CE on the gold response at T = 1, per student trained token;
    valid [B, k]: False where the source's logits were not finite on a trained position (such
    a pair has zero ce and no support, and must not be used);
    aligned [B, k, T]: True where the source has a distribution for that student position.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    ce: torch.Tensor
    valid: torch.Tensor
    aligned: torch.Tensor


class SourcePool:
    """N frozen sources, kept out of the LightningModule's state dict (checkpoints never hold them).

    Each source's outputs are expressed over the student's vocabulary as top-K sparse
    distributions; a source with the student's own tokenizer is read position by position.
    """

    def __init__(
        self,
        paths: list[str],
        student_tokenizer: PreTrainedTokenizerBase,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        top_k: int = 10,
    ):
        self.names = [source_name(p) for p in paths]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"model.sources: source directory names must be unique, got {self.names}")
        self.vocab_size = len(student_tokenizer)
        self.top_k = min(top_k, self.vocab_size)
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
    def run(self, selected: torch.Tensor, batch: dict, temperature: float = 1.0) -> SourceOutputs:
        """Run each source only on the sequences that selected it. selected [B, k] source indices.

        Output rows past the tokenizer's length (padded embeddings) are dropped.
        """
        input_ids, targets = batch["input_ids"], batch["targets"]
        (size, k), length, device = selected.shape, input_ids.shape[1], input_ids.device
        ids = torch.full((size, k, length, self.top_k), -1, device=device)
        logprobs = torch.full((size, k, length, self.top_k), -math.inf, device=device)
        ce = torch.zeros(size, k, device=device)
        valid = torch.ones(size, k, dtype=torch.bool, device=device)
        aligned = torch.zeros(size, k, length, dtype=torch.bool, device=device)
        for index, model in enumerate(self.models):
            rows, slots = (selected == index).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            logits = model(input_ids=input_ids[rows], attention_mask=batch["attention_mask"][rows]).logits[..., : self.vocab_size].float()
            trained = targets[rows] != IGNORE_INDEX  # [R, T]
            # NaN or +inf anywhere in a row's logits makes its log-normalizer non-finite; a -inf
            # logit alone is a legitimate zero probability.
            normalizer = torch.logsumexp(logits, dim=-1)  # [R, T]
            finite = (torch.isfinite(normalizer) | ~trained).all(-1)  # [R]: usable where it is trained
            gold = logits.gather(-1, targets[rows].clamp(min=0).unsqueeze(-1)).squeeze(-1) - normalizer
            ce[rows, slots] = torch.where(finite, sequence_ce(torch.where(trained, gold, 0.0), targets[rows]), 0.0)
            scaled = logits if temperature == 1.0 else logits / temperature
            top = scaled.topk(self.top_k, dim=-1)
            top_logprobs = top.values - (normalizer[..., None] if temperature == 1.0 else torch.logsumexp(scaled, -1, keepdim=True))
            usable = finite[:, None] & trained  # [R, T]
            ids[rows, slots] = torch.where(usable[..., None], top.indices, -1)
            logprobs[rows, slots] = torch.where(usable[..., None], top_logprobs, -math.inf)
            aligned[rows, slots] = usable
            valid[rows, slots] = finite
        return SourceOutputs(ids, logprobs, ce, valid, aligned)
