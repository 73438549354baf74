"""Loading models by path or hub name: the path check that fails at once naming its config
key, the dtypes a config may name, frozen models, and whether two tokenizers are one.

Shared by the student (`fusion.stages.student`), the sources (`fusion.sources.pool`) and the
evaluation of a model on its own (`fusion.stages.evaluation`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

_HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hub_offline() -> bool:
    """Whether the environment forbids the hub (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set)."""
    return any(
        os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def resolve_model_path(path: str, key: str) -> str:
    """A local model directory, or a hub name; anything else fails at once, naming the config key.

    A name that is not a local directory is taken for a hub name only when it looks like one
    (org/model), its first part is not a local directory (`zoo/nosuch` beside a `zoo/` folder is
    a missing path), and the hub is not switched off (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE): a
    missing local model never waits on the hub's retries.
    """
    if os.path.isdir(path):
        config = os.path.join(path, "config.json")
        if not os.path.isfile(config):
            raise ValueError(f"{key}: {path!r} is a directory but not a model (no config.json in it)")
        try:
            with open(config) as f:
                json.load(f)
        except (OSError, ValueError) as error:
            raise ValueError(f"{key}: {config!r} is not a readable JSON model config ({error})") from None
        return path
    parent = os.path.dirname(os.path.normpath(path))
    if os.path.exists(path) or not _HUB_NAME.match(path) or (parent and os.path.isdir(parent)) or hub_offline():
        hub = "; the hub is switched off (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)" if hub_offline() else ""
        raise FileNotFoundError(f"{key}: {path!r} does not exist (expected a model directory or a hub name like org/model{hub})")
    return path


def same_vocabulary(student: PreTrainedTokenizerBase, source: PreTrainedTokenizerBase) -> bool:
    """Same tokens with the same ids and special tokens: no alignment needed."""
    return student.get_vocab() == source.get_vocab() and (student.bos_token_id, student.eos_token_id) == (
        source.bos_token_id,
        source.eos_token_id,
    )


def check_same_vocabulary(student: PreTrainedTokenizerBase, other: PreTrainedTokenizerBase, key: str) -> None:
    """For a model that must use the student's own tokenizer (a new base for the student)."""
    if not same_vocabulary(student, other):
        raise ValueError(
            f"{key}: its tokenizer ({len(other)} tokens) differs from the student's ({len(student)} tokens); it must be the student's"
        )


@contextmanager
def named_load(key: str, path: str) -> Iterator[None]:
    """Loading `path` (for config key `key`): a model or tokenizer that cannot be loaded, from disk
    or the hub, fails naming the key and the path, with the library's first line as the reason."""
    try:
        yield
    except OSError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OSError(f"{key}: could not load {path!r} (a model directory or a hub name like org/model): {reason}") from None


def load_frozen(path: str, dtype: str, trust_remote_code: bool):
    """The model at `path` (safetensors weights only), in eval mode, with no parameter trained."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=True)
    model.eval().requires_grad_(False)
    return model
