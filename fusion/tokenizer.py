"""A character-level tokenizer trained locally, for the embedded zoo and the tests.

Every printable ASCII character is one token, so any prompt of the embedded task suite
tokenizes without unknowns, offsets map one token to one character, and nothing is downloaded.
"""

from __future__ import annotations

import json
import os

from tokenizers import Tokenizer, decoders, models
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
ALPHABET = [chr(code) for code in range(32, 127)]  # printable ASCII, space included


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A fast tokenizer with one token per printable ASCII character (99 tokens in all)."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + ALPHABET)}
    # BPE without merges splits a string into its characters and keeps character offsets.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="right",
    )


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer saved at `path`, as saved.

    transformers 5 lets a model directory's `model_type` pick the tokenizer class, which for a
    generic `tokenizer.json` (saved as TokenizersBackend) silently swaps in that family's
    pre-tokenizer: our character tokenizer inside a Qwen2 directory would lose its spaces. A
    generic tokenizer is therefore loaded as the generic fast tokenizer it was saved as.
    """
    config_path = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            saved_class = json.load(f).get("tokenizer_class")
        if saved_class in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
