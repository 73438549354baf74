"""Alignment across tokenizers on hand-made strings: position maps written out by hand, coverage,
vocabulary-map counts and the sparse projection against a dense reference."""

from __future__ import annotations

import functools
import json
import math
import os

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizer, PreTrainedTokenizerFast

from fusion.data import IGNORE_INDEX
from fusion.data.datamodule import collate, encode
from fusion.data.tokenizer import SPECIAL_TOKENS, build_char_tokenizer, build_gpt2_tokenizer, train_bpe_tokenizer
from fusion.sources import vocab_map as vocab_map_module
from fusion.sources.alignment import Aligner, token_bytes
from fusion.sources.vocab_map import build_vocab_map, fingerprint, project_topk, vocab_map_counts

X = IGNORE_INDEX


@pytest.fixture(scope="module")
def gpt2() -> PreTrainedTokenizerFast:
    return build_gpt2_tokenizer()


@pytest.fixture(scope="module")
def char() -> PreTrainedTokenizerFast:
    return build_char_tokenizer()


def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece-style: `▁` marks spaces, a dummy prefix, `<0xNN>` byte fallback; merges ▁c and af."""
    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)])}
    for piece in ["▁", "c", "a", "f", "é", "▁c", "af"]:
        vocab[piece] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "c"), ("a", "f")], unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>")


def byte_bpe(merges: list[tuple[str, str]]) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2's scheme) with the char tokenizer's specials and the given merges."""
    symbols = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + sorted(symbols))}
    for left, right in merges:
        vocab[left + right] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


@functools.lru_cache
def aligner(student, source) -> Aligner:
    return Aligner(student, source)


def align(student, source, *pairs: tuple[str, str]):
    """Encode (prompt, response) pairs with the student, collate them, align them with the source."""
    features = [dict(encode(student, prompt, response, 64), row=None) for prompt, response in pairs]
    batch = collate(features, student.pad_token_id)
    return batch, aligner(student, source)(batch["input_ids"], batch["attention_mask"], batch["targets"])


def test_token_bytes_normalize_every_scheme(gpt2, char):
    gpt2_bytes = token_bytes(gpt2)
    assert len(gpt2_bytes) == 50257 and gpt2_bytes[50256] is None
    assert [gpt2_bytes[i] for i in (11875, 2634, 10545, 1065)] == [b" cats", "é".encode(), b" \xe6", b"12"]
    meta = metaspace_tokenizer()
    meta_bytes = token_bytes(meta)
    assert meta_bytes[:3] == [None, None, None]
    assert meta_bytes[3 + 0xE6] == b"\xe6"
    assert [meta_bytes[meta.convert_tokens_to_ids(p)] for p in ("▁", "▁c", "é")] == [b" ", b" c", "é".encode()]
    char_bytes = token_bytes(char)
    assert char_bytes[:4] == [None] * 4 and char_bytes[4] == b" " and char_bytes[char.convert_tokens_to_ids("a")] == b"a"
    bpe = train_bpe_tokenizer(["backward cat=tac", "sort< cat, act=act, cat"] * 10, 280)
    ids = bpe("sort< cat, tac=", add_special_tokens=False)["input_ids"]
    assert 260 < len(bpe) <= 280 and len(ids) < 15 and b"".join(token_bytes(bpe)[i] for i in ids) == b"sort< cat, tac="


class SlowChar(PreTrainedTokenizer):
    """A slow (pure Python) character tokenizer: no byte offsets, so no alignment."""

    def __init__(self, **kwargs):
        self.vocab = {c: i for i, c in enumerate(["<unk>"] + [chr(i) for i in range(32, 127)])}
        super().__init__(unk_token="<unk>", **kwargs)

    def get_vocab(self):
        return dict(self.vocab)

    def _tokenize(self, text):
        return list(text)


def test_slow_tokenizer_is_refused_by_name(char):
    slow = SlowChar(name_or_path="zoo/slow-source")
    with pytest.raises(ValueError, match=r"zoo/slow-source.*slow tokenizer.*fast tokenizer"):
        Aligner(char, slow)
    with pytest.raises(ValueError, match="zoo/slow-source"):
        token_bytes(slow)


def test_bpe_source_leaves_positions_inside_its_tokens_unaligned(char, gpt2):
    # Text "12+34=46 cats". GPT-2: <eot> 12 + 34 = 46 Ġcats <eot>; the char student splits 12, 34, 46, Ġcats.
    batch, out = align(char, gpt2, ("12+34=", "46 cats"))
    assert gpt2.convert_ids_to_tokens(out.input_ids[0].tolist()) == ["<|endoftext|>", "12", "+", "34", "=", "46", "Ġcats", "<|endoftext|>"]
    # Student t predicts: 1 2 + 3 4 = 4 6 ␣ c a t s <eos> (nothing)
    assert out.position_map.tolist() == [[0, -1, 1, 2, -1, 3, 4, -1, 5, -1, -1, -1, -1, 6, -1]]
    assert out.targets.tolist() == [[X, X, X, X, 3510, 11875, 50256, X]]  # 46, Ġcats, eos: the response's tokens
    assert (out.aligned.tolist(), out.trained.tolist()) == ([3], [8]) and out.coverage == pytest.approx(3 / 8)


def test_source_that_splits_a_student_token_aligns_everywhere(char, gpt2):
    # The GPT-2 student's "12" and "34" are two char-source tokens each; every student boundary is a source one.
    batch, out = align(gpt2, char, ("=1234", " cats"))
    assert gpt2.convert_ids_to_tokens(batch["input_ids"][0].tolist()) == ["<|endoftext|>", "=", "12", "34", "Ġcats", "<|endoftext|>"]
    assert "".join(char.convert_ids_to_tokens(out.input_ids[0].tolist())) == "<bos>=1234 cats<eos>"
    assert out.position_map.tolist() == [[0, 1, 3, 5, 10, -1]]
    assert out.targets[0].tolist() == [X] * 5 + char.convert_tokens_to_ids(list(" cats")) + [2, X]
    assert (out.aligned.tolist(), out.trained.tolist()) == ([2], [2])


def test_multibyte_utf8_split_differently_by_both_tokenizers(gpt2):
    # "café 日本": GPT-2 spells c af é | Ġ+E6 97 A5 E6+9C AC; the Metaspace source spells ▁c af é | ▁ E6 97 A5 E6 9C AC
    # with a dummy prefix space that is not part of the text. Byte starts: GPT-2 0 1 3 | 5 7 8 9 11; source 0 1 3 | 5 6 7 8 9 10 11.
    source = metaspace_tokenizer()
    _, out = align(gpt2, source, ("café", " 日本"))
    assert source.convert_ids_to_tokens(out.input_ids[0].tolist()) == [
        "<s>",
        "▁c",
        "af",
        "é",
        "▁",
        "<0xE6>",
        "<0x97>",
        "<0xA5>",
        "<0xE6>",
        "<0x9C>",
        "<0xAC>",
        "</s>",
    ]
    assert out.position_map.tolist() == [[0, 1, 2, 3, 5, 6, 7, 9, 10, -1]]
    source_ids = out.input_ids[0].tolist()
    assert out.targets[0].tolist() == [X, X, X] + source_ids[4:] + [X]  # from ▁ (byte 5, where the response starts) on
    assert (out.aligned.tolist(), out.trained.tolist()) == ([6], [6])


def test_special_token_text_is_plain_text_for_the_source(char, gpt2):
    # The char student spells "<|endoftext|>" in characters; GPT-2 must read it as text, not as its eos.
    _, out = align(char, gpt2, ("a<|endoftext|>", "b"))
    assert gpt2.convert_ids_to_tokens(out.input_ids[0].tolist()) == [
        "<|endoftext|>",
        "a",
        "<",
        "|",
        "end",
        "of",
        "text",
        "|",
        ">",
        "b",
        "<|endoftext|>",
    ]
    assert out.position_map.tolist() == [[0, 1, 2, 3, -1, -1, 4, -1, 5, -1, -1, -1, 6, 7, 8, 9, -1]]
    assert out.targets.tolist() == [[X] * 8 + [65, 50256, X]]


def test_special_token_inside_student_text_spells_its_content(char, gpt2):
    # "x<eos>y": the char tokenizer reads "<eos>" in the prompt as its special; GPT-2 spells < e os >.
    batch, out = align(char, gpt2, ("x<eos>", "y"))
    assert batch["input_ids"][0].tolist() == [1, char.convert_tokens_to_ids("x"), 2, char.convert_tokens_to_ids("y"), 2]
    assert gpt2.convert_ids_to_tokens(out.input_ids[0].tolist()) == ["<|endoftext|>", "x", "<", "e", "os", ">", "y", "<|endoftext|>"]
    assert out.position_map.tolist() == [[0, 1, 5, 6, -1]]


def test_source_without_bos_leaves_the_bos_position_unaligned(char):
    no_bos = PreTrainedTokenizerFast(
        tokenizer_object=build_char_tokenizer().backend_tokenizer, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    _, out = align(char, no_bos, ("ab", "c"))
    assert out.input_ids.tolist() == [char("abc", add_special_tokens=False)["input_ids"] + [2]]
    assert out.position_map.tolist() == [[-1, 0, 1, 2, -1]]
    assert out.targets.tolist() == [[X, char.convert_tokens_to_ids("c"), 2, X]]
    assert (out.aligned.tolist(), out.trained.tolist()) == ([2], [2])


def test_identical_tokenizers_align_one_to_one_in_a_padded_batch(char):
    batch, out = align(char, char, ("ab=", "ba"), ("x=", "yyyy"))
    assert torch.equal(out.input_ids, batch["input_ids"]) and torch.equal(out.targets, batch["targets"])
    assert out.position_map.tolist() == [[0, 1, 2, 3, 4, 5, -1, -1], [0, 1, 2, 3, 4, 5, 6, -1]]
    assert (out.aligned.tolist(), out.trained.tolist(), out.coverage) == ([3, 5], [3, 5], 1.0)


def test_unknown_source_tokens_span_the_text_they_replace(char, gpt2):
    # The char source has no "é": its <unk> covers bytes 3-4. GPT-2 student: <eot> c af é ! <eot>.
    _, out = align(gpt2, char, ("café", "!"))
    assert char.convert_ids_to_tokens(out.input_ids[0].tolist()) == ["<bos>", "c", "a", "f", "<unk>", "!", "<eos>"]
    assert out.position_map.tolist() == [[0, 1, 3, 4, 5, -1]]
    assert out.targets.tolist() == [[X, X, X, X, char.convert_tokens_to_ids("!"), 2, X]]


def test_a_batch_aligns_each_row_as_if_alone(char, gpt2):
    pairs = [("12+34=", "46 cats"), ("sort< b, a=", "a, b"), ("x=", ""), ("backward abc=", "cba")]
    _, batch = align(char, gpt2, *pairs)
    for row, pair in enumerate(pairs):
        _, alone = align(char, gpt2, pair)
        width, length = alone.input_ids.shape[1], alone.position_map.shape[1]
        assert torch.equal(batch.input_ids[row, :width], alone.input_ids[0]) and batch.attention_mask[row].sum() == width
        assert torch.equal(batch.targets[row, :width], alone.targets[0]) and (batch.targets[row, width:] == X).all()
        assert torch.equal(batch.position_map[row, :length], alone.position_map[0]) and (batch.position_map[row, length:] == -1).all()
    assert batch.trained.tolist() == [8, 5, 1, 4] and batch.aligned.tolist()[2] == 1  # "x=" then eos only


def test_a_source_that_changes_the_text_is_named(char):
    source = build_char_tokenizer()
    source.backend_tokenizer.normalizer = normalizers.Lowercase()
    source.name_or_path = "zoo/lowercase-source"
    with pytest.raises(ValueError, match=r"zoo/lowercase-source.*spell b'ab='"):
        align(char, source, ("AB=", "c"))


def test_vocab_map_counts_per_method(char):
    # 4 specials, 256 byte symbols and 4 merges: 95 bytes are printable ASCII (exact in the char
    # student), 161 are not; "ca", "cat", "Ġcat", "52" have no char token of their own.
    source = byte_bpe([("c", "a"), ("ca", "t"), ("Ġ", "cat"), ("5", "2")])
    rows = len(source) + 6  # a model's padded output matrix: 6 rows no token uses
    counts = {}
    for method in ("exact+med", "exact+prefix", "exact"):
        vocab_map = build_vocab_map(source, char, rows, method)
        assert vocab_map.shape == (rows,) and (vocab_map[len(source) :] == -1).all()
        assert vocab_map[[0, 1, 2, 3]].tolist() == [0, 1, 2, -1]  # pad, bos, eos by role; unk dropped
        counts[method] = vocab_map_counts(vocab_map, source, char)
        merged = vocab_map[[source.convert_tokens_to_ids(t) for t in ("ca", "cat", "Ġcat", "52")]]
        if method != "exact":
            assert char.convert_ids_to_tokens(merged.tolist()) == ["c", "c", " ", "5"]
    # med maps every other byte too; prefix drops the 161 bytes (no char spells them, or <unk>).
    assert counts["exact+med"] == {"special": 3, "exact": 95, "fallback": 165, "dropped": 7}
    assert counts["exact+prefix"] == {"special": 3, "exact": 95, "fallback": 4, "dropped": 168}
    assert counts["exact"] == {"special": 3, "exact": 95, "fallback": 0, "dropped": 172}


def test_vocab_map_of_a_fine_source_into_gpt2_is_exact(char, gpt2):
    vocab_map = build_vocab_map(char, gpt2, len(char), "exact+med")
    assert vocab_map[[0, 1, 2, 3]].tolist() == [50256, 50256, 50256, -1]
    assert gpt2.convert_ids_to_tokens(vocab_map[char.convert_tokens_to_ids(["a", " "])].tolist()) == ["a", "Ġ"]
    assert vocab_map_counts(vocab_map, char, gpt2) == {"special": 3, "exact": 95, "fallback": 0, "dropped": 1}


def test_vocab_map_rows_fewer_than_tokens_are_refused(char):
    with pytest.raises(ValueError, match="98 output rows for a tokenizer of 99 tokens"):
        build_vocab_map(char, char, 98)


def test_vocab_map_cache_is_reused_and_keyed_by_fingerprint(char, tmp_path, monkeypatch):
    builds = []
    real = vocab_map_module.map_vocabulary
    monkeypatch.setattr(vocab_map_module, "map_vocabulary", lambda *args: builds.append(args[3]) or real(*args))
    source = byte_bpe([("c", "a")])
    first = build_vocab_map(source, char, 300, "exact+med", cache_dir=str(tmp_path))
    second = build_vocab_map(source, char, 300, "exact+med", cache_dir=str(tmp_path))
    assert builds == ["exact+med"] and torch.equal(first, second)
    summary = json.loads((tmp_path / f"vocab_map-{fingerprint(source, char, 300, 'exact+med')[:16]}.json").read_text())
    assert summary["counts"] == {"special": 3, "exact": 95, "fallback": 162, "dropped": 40}
    build_vocab_map(source, char, 300, "exact+prefix", cache_dir=str(tmp_path))
    assert builds == ["exact+med", "exact+prefix"]
    assert sorted(os.listdir(tmp_path)) == sorted(
        f"vocab_map-{fingerprint(source, char, 300, m)[:16]}.{ext}"
        for m in ("exact+med", "exact+prefix")
        for ext in ("json", "safetensors")
    )
    keys = {
        fingerprint(source, char, 300, "exact+med"),
        fingerprint(source, char, 301, "exact+med"),
        fingerprint(byte_bpe([("c", "b")]), char, 300, "exact+med"),
    }
    assert len(keys) == 3


def test_project_topk_sums_duplicates_against_a_dense_reference():
    # Source probabilities over 6 tokens; tokens 1 and 2 land on student 1, token 3 is dropped.
    probs = torch.tensor([0.1, 0.3, 0.2, 0.25, 0.05, 0.1])
    vocab_map = torch.tensor([0, 1, 1, -1, 2, 0])
    ids, logprobs = project_topk(probs.log(), vocab_map, k=2, oversample=3)
    # dense over the student's 3 ids: [0.1 + 0.1, 0.3 + 0.2, 0.05] -> top-2 ids 1, 0
    assert ids.tolist() == [1, 0]
    assert logprobs.exp().tolist() == pytest.approx([0.5, 0.2])
    # Only the source's top 4 (0.3, 0.25, 0.2 and a 0.1 of student 0) are read: student 0 gets one 0.1.
    ids, logprobs = project_topk(probs.log().expand(2, 1, 6), vocab_map, k=2, oversample=2)  # [2, 1, 2]
    assert ids.tolist() == [[[1, 0]]] * 2
    assert logprobs.exp().flatten().tolist() == pytest.approx([0.5, 0.1] * 2)
    # Only the top 3 (0.3, 0.25 dropped, 0.2): one student id, padded with -1 / -inf.
    ids, logprobs = project_topk(probs.log(), vocab_map, k=3, oversample=1)
    assert ids.tolist() == [1, -1, -1]
    assert logprobs[0].exp().item() == pytest.approx(0.5) and logprobs[1:].tolist() == [-math.inf, -math.inf]
    ids, logprobs = project_topk(probs.log(), vocab_map, k=8, oversample=1)  # wider than the source
    assert ids.tolist() == [1, 0, 2, -1, -1, -1, -1, -1]
    assert logprobs[:3].exp().tolist() == pytest.approx([0.5, 0.2, 0.05])


def test_the_first_source_token_at_a_byte_is_the_first_in_text_order(char):
    """Where several source tokens start at one byte (zero-width tokens, as a lone SentencePiece
    prefix can be), the position takes the first of them, whatever order NumPy writes in."""
    source = Aligner(char, char)
    real = source.source_tokens
    width = 40  # zero-width tokens inserted at byte 1, before the token that starts there

    def with_zero_width_tokens(texts):
        entries = []
        for ids, starts, ends in real(texts):
            entries.append(
                (
                    np.concatenate([ids[:1], np.full(width, ids[1]), ids[1:]]),
                    np.concatenate([starts[:1], np.full(width, starts[1]), starts[1:]]),
                    np.concatenate([ends[:1], np.full(width, starts[1]), ends[1:]]),
                )
            )
        return entries

    source.source_tokens = with_zero_width_tokens
    features = [dict(encode(char, "ab=", "ba", 64), row=None)]
    batch = collate(features, char.pad_token_id)
    out = source(batch["input_ids"], batch["attention_mask"], batch["targets"])
    # Columns: bos 0, "a" 1, the zero-width tokens 2..41, "b" 42, "=" 43, ...
    assert out.position_map[0, 1] == 1  # byte 1: predicted where the first zero-width token is
    assert out.position_map[0, 2] == width + 2  # byte 2: the token after "b"


def test_default_vocab_map_dir_is_the_per_user_cache(monkeypatch, tmp_path):
    """FUSION_CACHE, else XDG_CACHE_HOME, else ~/.cache; read when called, not at import."""
    from fusion.sources.vocab_map import default_cache_dir

    monkeypatch.setenv("FUSION_CACHE", "/data/me/fusion")
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg/cache")
    assert default_cache_dir() == "/data/me/fusion/vocab_maps"
    monkeypatch.setenv("FUSION_CACHE", "")  # set but empty: as if unset
    assert default_cache_dir() == "/xdg/cache/fusion/vocab_maps"
    monkeypatch.delenv("FUSION_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", "/home/someone")
    assert default_cache_dir() == "/home/someone/.cache/fusion/vocab_maps"


def test_the_source_tokenizes_prompt_and_response_apart(char):
    """A source whose BPE merges `=` with `-` (its tokenizer saw whole rows) reads `8=` and `-3`
    as `encode` built its training rows: `8`, `=` | `-`, `3`, never `=-`. The response's first
    byte is then a shared boundary, read at the position of `=`, and the source's first target
    is `-`."""
    source = byte_bpe([("=", "-")])
    batch, side = align(char, source, ("8=", "-3"))
    ids = side.input_ids[0, : int(side.attention_mask[0].sum())].tolist()
    pieces = source.convert_ids_to_tokens(ids)
    assert pieces == ["<bos>", "8", "=", "-", "3", "<eos>"]
    assert "=-" in source.get_vocab() and source("8=-3", add_special_tokens=False)["input_ids"] != ids[1:5]  # joint: 8, =-, 3
    # Student positions: 0 <bos>, 1 '8', 2 '=', 3 '-', 4 '3', 5 <eos>; each predicts the next at the
    # source's same position (read jointly, position 2 would predict '-' from inside `=-`: -1).
    assert side.position_map[0, :5].tolist() == [0, 1, 2, 3, 4]
    assert side.inside_position[0, :5].tolist() == [-1] * 5
    assert source.convert_ids_to_tokens(side.targets[0, 2:5].tolist()) == ["-", "3", "<eos>"]
    assert side.targets[0, :2].tolist() == [X, X]
