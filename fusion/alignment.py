"""Position alignment between the student's tokens and a source's tokens of the same text.

Every tokenizer is reduced to the bytes each token contributes to the text (`token_bytes`):
GPT-2's byte-to-unicode symbols (`Ġ` for a space), SentencePiece's `▁` space marker and its
`<0xNN>` byte pieces all become plain bytes, and special tokens contribute none. A token starts
at the byte where its bytes begin, so a token whose text begins with a space starts AT the space.

The rule (DESIGN.md, "Alignment across tokenizers"), exact and linear in length:

- The text is what the student's tokens spell. The source tokenizes it (with its own bos first
  and, when the student's row ends with eos, its own eos last); its tokens must spell the same
  bytes, else the source is refused by name.
- Student position t predicts student token t+1, which starts at byte c. It is aligned with
  source position j when source token j+1 is the FIRST source token starting at byte c. Where no
  source token starts at c (c falls inside a source token), t is unaligned (-1).
- The student position predicting eos aligns with the source position predicting the source's
  eos. The student's bos position predicts the token at byte 0, so it aligns with the source's
  bos position when the source has a bos, and is unaligned when it has none.
- Source targets: source position j is trained (its target is source token j+1) when token j+1
  overlaps the student's trained span, which runs from the first trained student token to the
  end, eos included; other positions get IGNORE_INDEX. So the source's NLL over its targets is
  its NLL of the response text in its own tokens.
- coverage = aligned trained student positions / trained student positions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
import re

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

from fusion.data import IGNORE_INDEX

UNALIGNED = -1
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def tokenizer_name(tokenizer: PreTrainedTokenizerBase) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def fast_backend(tokenizer: PreTrainedTokenizerBase) -> Tokenizer:
    """The `tokenizers` backend of a fast tokenizer, or a ValueError naming the tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not getattr(tokenizer, "is_fast", False) or backend is None:
        raise ValueError(
            f"tokenizer {tokenizer_name(tokenizer)!r} ({type(tokenizer).__name__}) is a slow tokenizer; "
            "alignment across tokenizers needs a fast tokenizer (a tokenizer.json with offsets)"
        )
    return backend


def _component_types(node: dict | None) -> list[dict]:
    """The components of a pre-tokenizer or decoder, with Sequences flattened."""
    if not node:
        return []
    children = node.get("pretokenizers") or node.get("decoders")
    return [c for child in children for c in _component_types(child)] if children else [node]


@lru_cache(maxsize=1)
def _byte_symbols() -> dict[int, int]:
    """GPT-2's printable symbol for each byte (`Ġ` is the space), inverted for str.translate: symbol -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    unprintable = [b for b in range(256) if b not in printable]
    return {**{b: b for b in printable}, **{256 + n: b for n, b in enumerate(unprintable)}}


def _model_pieces(model: dict, size: int) -> list[str | None]:
    """The model's token strings by id (Unigram stores [piece, score] pairs, the others piece -> id)."""
    vocab = model.get("vocab") or {}
    pieces: list[str | None] = [None] * size
    entries = ((piece, i) for i, (piece, _) in enumerate(vocab)) if isinstance(vocab, list) else vocab.items()
    for piece, i in entries:
        if i < size:
            pieces[i] = piece
    return pieces


def special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids of the tokenizer's special tokens (its roles and every added token marked special)."""
    added = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return set(tokenizer.all_special_ids) | added


def token_bytes(tokenizer: PreTrainedTokenizerBase) -> list[bytes | None]:
    """The exact bytes each token id (< len(tokenizer)) contributes to the text; None for specials.

    The scheme is read from the backend's JSON: a ByteLevel pre-tokenizer or decoder maps GPT-2's
    symbols back to bytes; a Metaspace component (or a decoder replacing `▁` by a space) turns the
    marker into a space; `<0xNN>` pieces under byte fallback are the byte 0xNN; anything else (our
    char tokenizer, plain BPE) is the UTF-8 of the token's string. Added non-special tokens are
    their content. WordPiece drops whitespace, so its tokens cannot spell the text: refused.
    """
    backend = fast_backend(tokenizer)
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model["type"] == "WordPiece":
        raise ValueError(f"tokenizer {tokenizer_name(tokenizer)!r} is WordPiece, whose tokens drop whitespace; alignment needs tokens that spell the text")
    components = _component_types(spec.get("pre_tokenizer")) + _component_types(spec.get("decoder"))
    byte_level = any(c["type"] == "ByteLevel" for c in components)
    markers = {c.get("replacement", "▁") for c in components if c["type"] == "Metaspace"}
    markers |= {c["pattern"].get("String") for c in components if c["type"] == "Replace" and c.get("content") == " "} - {None}
    byte_fallback = bool(model.get("byte_fallback")) or any(c["type"] == "ByteFallback" for c in components)
    specials = special_ids(tokenizer)
    added = {i: token.content for i, token in tokenizer.added_tokens_decoder.items()}
    symbols = _byte_symbols()
    pieces: list[bytes | None] = []
    for i, piece in enumerate(_model_pieces(model, len(tokenizer))):
        if i in specials:
            pieces.append(None)
        elif i in added:
            pieces.append(added[i].encode())
        elif piece is None:
            pieces.append(None)
        elif byte_level:
            pieces.append(piece.translate(symbols).encode("latin-1"))
        elif byte_fallback and BYTE_PIECE.fullmatch(piece):
            pieces.append(bytes([int(piece[3:5], 16)]))
        else:
            for marker in markers:
                piece = piece.replace(marker, " ")
            pieces.append(piece.encode())
    return pieces


@dataclass(frozen=True)
class SequenceAlignment:
    source_ids: list[int]  # [S] the source's tokens of the text, with its bos/eos
    source_targets: list[int]  # [S] source token j+1 on the trained span, else IGNORE_INDEX
    position_map: list[int]  # [T] source position aligned with each student position, or -1
    aligned: int  # trained student positions that are aligned
    trained: int  # trained student positions


@dataclass(frozen=True)
class AlignedBatch:
    input_ids: torch.Tensor  # [B, S] the source's tokens, right-padded
    attention_mask: torch.Tensor  # [B, S]
    targets: torch.Tensor  # [B, S] pre-shifted like fusion.data.collate's, IGNORE_INDEX off the trained span
    position_map: torch.Tensor  # [B, T] long: source position for each student position, -1 unaligned
    aligned: int
    trained: int

    @property
    def coverage(self) -> float:
        return self.aligned / max(self.trained, 1)


def _utf8_span(data: bytes) -> tuple[int, int]:
    """The longest run of `data` that decodes, trimming split characters at the ends (truncated rows)."""
    start, end = 0, len(data)
    while start < min(3, end) and 0x80 <= data[start] < 0xC0:
        start += 1
    for cut in range(4):
        try:
            data[start : end - cut].decode()
            return start, end - cut
        except UnicodeDecodeError:
            continue
    data[start:end].decode()  # a split in the middle: let the error name the bytes
    return start, end


class Aligner:
    """Aligns the student's rows with one source's tokenization of the same text (rule: module docstring).

    The source's tokenization of each text is cached (up to `cache_size` texts), so epochs after
    the first tokenize nothing.
    """

    def __init__(self, student: PreTrainedTokenizerBase, source: PreTrainedTokenizerBase, cache_size: int = 200_000):
        self.source_name = tokenizer_name(source)
        self.student_bos, self.student_eos = student.bos_token_id, student.eos_token_id
        self.source_bos, self.source_eos = source.bos_token_id, source.eos_token_id
        self.source_pad = next((i for i in (source.pad_token_id, source.eos_token_id) if i is not None), 0)
        # What a student token spells: its bytes; a special inside the text spells its content, unk U+FFFD.
        self.student_text = [
            piece if piece is not None else ("\ufffd" if i == student.unk_token_id else student.convert_ids_to_tokens(i)).encode()
            for i, piece in enumerate(token_bytes(student))
        ]
        self.source_bytes = token_bytes(source)
        # A copy of the source's backend that reads special-token strings in the text as plain text.
        self.backend = Tokenizer.from_str(fast_backend(source).to_str())
        self.backend.no_truncation()
        self.backend.no_padding()
        self.backend.encode_special_tokens = True
        self.cache: dict[str, tuple[list[int], np.ndarray, np.ndarray]] = {}
        self.cache_size = cache_size

    def _tokenize(self, texts: list[str]) -> None:
        """Source ids and byte [start, end) of each token for the uncached texts."""
        todo = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if len(self.cache) + len(todo) > self.cache_size:
            self.cache.clear()
        for text, encoding in zip(todo, self.backend.encode_batch_fast(todo, add_special_tokens=False)):
            ids = encoding.ids
            pieces = [self.source_bytes[i] for i in ids]
            data = text.encode()
            spelled = b"".join(p for p in pieces if p is not None)
            if None in pieces or spelled not in (data, b" " + data):
                raise ValueError(
                    f"source tokenizer {self.source_name!r}: its tokens of {text!r} spell "
                    f"{b''.join(p if p is not None else b'<special>' for p in pieces)!r}; alignment needs a source "
                    "whose tokens spell the text (no unknown tokens, no normalizer that changes it)"
                )
            ends = np.cumsum([len(p) for p in pieces], dtype=np.int64)
            # A dummy prefix space (SentencePiece, add_prefix_space) is not part of the text.
            ends -= len(spelled) - len(data)
            starts = np.maximum(np.concatenate(([0], ends[:-1])), 0)
            self.cache[text] = (ids, starts, np.maximum(ends, 0))

    def align_sequences(self, rows: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[SequenceAlignment]:
        """Align unpadded student rows, each (input_ids, targets) as built by fusion.data.encode/collate."""
        prepared = []
        for ids, targets in rows:
            has_bos = len(ids) > 1 and ids[0] == self.student_bos
            has_eos = len(ids) > 1 and ids[-1] == self.student_eos
            pieces = [self.student_text[i] for i in ids[int(has_bos) : len(ids) - int(has_eos)]]
            data = b"".join(pieces)
            lo, hi = _utf8_span(data)
            # Byte where each student token starts, relative to the decoded text (bos at 0, eos at the end).
            starts = np.zeros(len(ids), dtype=np.int64)
            starts[int(has_bos) : int(has_bos) + len(pieces)] = np.cumsum([0] + [len(p) for p in pieces[:-1]]) - lo
            if has_eos:
                starts[-1] = hi - lo
            prepared.append((data[lo:hi].decode(), starts, has_eos, np.asarray(targets) != IGNORE_INDEX))
        self._tokenize([text for text, *_ in prepared])
        return [self._align(*row) for row in prepared]

    def _align(self, text: str, starts: np.ndarray, has_eos: bool, trained: np.ndarray) -> SequenceAlignment:
        text_ids, source_starts, source_ends = self.cache[text]
        size = len(text.encode())
        offset = int(self.source_bos is not None)
        source_ids = [self.source_bos] * offset + text_ids
        add_eos = has_eos and self.source_eos is not None
        if add_eos:
            source_ids.append(self.source_eos)
        # first[c] = the source index of the first text token starting at byte c, or -1.
        first = np.full(size + 1, -1, dtype=np.int64)
        indices = np.arange(offset, offset + len(text_ids))
        first[source_starts[::-1]] = indices[::-1]
        # Student position t predicts token t+1 at byte next[t].
        length = len(starts)
        nxt = starts[1:]
        inside = (nxt >= 0) & (nxt < size)
        source_next = np.where(inside, first[np.clip(nxt, 0, size)], -1)
        if has_eos:
            source_next[-1] = len(source_ids) - 1 if add_eos else -1
        position_map = np.full(length, UNALIGNED, dtype=np.int64)
        position_map[:-1] = np.where(source_next >= 1, source_next - 1, UNALIGNED)
        # Source token j+1 is trained when it overlaps [first trained student token, end].
        source_targets = [IGNORE_INDEX] * len(source_ids)
        if trained.any():
            response_start = starts[int(np.argmax(trained)) + 1]
            for j in np.flatnonzero(source_ends > response_start):
                if offset + j >= 1:  # without a bos, nothing predicts the first source token
                    source_targets[offset + j - 1] = text_ids[j]
            if add_eos and trained[-2]:
                source_targets[-2] = self.source_eos
        return SequenceAlignment(
            source_ids=source_ids,
            source_targets=source_targets,
            position_map=position_map.tolist(),
            aligned=int((trained & (position_map >= 0)).sum()),
            trained=int(trained.sum()),
        )

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor) -> AlignedBatch:
        """The source's side of a collated student batch ([B, T] tensors from fusion.data.collate)."""
        lengths = attention_mask.sum(1).tolist()
        ids, tgt = input_ids.tolist(), targets.tolist()
        rows = self.align_sequences([(ids[b][:n], tgt[b][:n]) for b, n in enumerate(lengths)])
        batch, width = len(rows), max(len(r.source_ids) for r in rows)
        source_ids = torch.full((batch, width), self.source_pad, dtype=torch.long)
        source_mask = torch.zeros(batch, width, dtype=torch.long)
        source_targets = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
        position_map = torch.full(input_ids.shape, UNALIGNED, dtype=torch.long)
        for b, row in enumerate(rows):
            n = len(row.source_ids)
            source_ids[b, :n] = torch.tensor(row.source_ids)
            source_mask[b, :n] = 1
            source_targets[b, :n] = torch.tensor(row.source_targets)
            position_map[b, : lengths[b]] = torch.tensor(row.position_map)
        return AlignedBatch(
            input_ids=source_ids,
            attention_mask=source_mask,
            targets=source_targets,
            position_map=position_map,
            aligned=sum(r.aligned for r in rows),
            trained=sum(r.trained for r in rows),
        )
