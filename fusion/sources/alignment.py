"""Position alignment between the student's tokens and a source's tokens of the same text.

Every tokenizer is reduced to the bytes each token contributes to the text (`token_bytes`):
GPT-2's byte-to-unicode symbols (`Ġ` for a space), SentencePiece's `▁` space marker and its
`<0xNN>` byte pieces all become plain bytes, and special tokens contribute none. A token starts
at the byte where its bytes begin, so a token whose text begins with a space starts AT the space.

The rule, exact and linear in length:

- The text is what the student's tokens spell. The source tokenizes it (with its own bos first
  and, when the student's row ends with eos, its own eos last); its tokens must spell the same
  bytes, else the source is refused by name.
- Student position t predicts student token t+1, which starts at byte c. It is aligned with
  source position j when source token j+1 is the FIRST source token starting at byte c. Where no
  source token starts at c (c falls inside a source token), t is unaligned (-1).
- The student position predicting eos aligns with the source position predicting the source's
  eos. The student's bos position predicts the token at byte 0, so it aligns with the source's
  bos position when the source has a bos, and is unaligned when it has none.
- Inside a source token: where c falls inside source token j+1 (it starts at byte b < c),
  `inside_position` is j and `inside_offset` is c - b, the bytes of that token the text has
  already spelled (`fusion.sources.marginal` reads the source's distribution there).
- A student token spanning several source tokens: where the student's next token (bytes c to e)
  starts at a shared boundary and holds more than one source token, `span_last` is the source
  position predicting the last source token that overlaps it and `span_spelled` that token's
  bytes before e (`fusion.sources.marginal` reads the student token's probability along them).
- Source targets: source position j is trained (its target is source token j+1) when token j+1
  overlaps the student's trained span, which runs from the first trained student token to the
  end, eos included; other positions get IGNORE_INDEX. So the source's NLL over its targets is
  its NLL of the response text in its own tokens.
- coverage = aligned trained student positions / trained student positions.

Edge cases, each with one rule: a special token inside the student's text spells its content
(the student's unk spells U+FFFD); special-token strings in the text are plain text to the
source; a source's unknown token stands for the text its offsets cover; a dummy prefix space a
source adds (SentencePiece, add_prefix_space) is not part of the text; a row truncated inside a
multi-byte character loses the split character, and positions predicting it are unaligned.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache

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
        raise ValueError(
            f"tokenizer {tokenizer_name(tokenizer)!r} is WordPiece, whose tokens drop whitespace; alignment needs tokens that spell the text"
        )
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
class AlignedBatch:
    """The source's side of a student batch; CPU tensors."""

    input_ids: torch.Tensor  # [B, S] the source's tokens of each row's text with its bos/eos, right-padded
    attention_mask: torch.Tensor  # [B, S]
    targets: torch.Tensor  # [B, S] pre-shifted like fusion.data.datamodule.collate's; IGNORE_INDEX off the trained span
    position_map: torch.Tensor  # [B, T] source position aligned with each student position, -1 unaligned
    aligned: torch.Tensor  # [B] trained student positions that are aligned
    trained: torch.Tensor  # [B] trained student positions
    inside_position: torch.Tensor  # [B, T] source position predicting the token the student's next byte is inside of, -1 elsewhere
    inside_offset: torch.Tensor  # [B, T] bytes of that token before the student's next byte (0 elsewhere)
    span_last: torch.Tensor  # [B, T] where the student's next token spans several source tokens from a shared boundary: the source position predicting the last of them, else -1
    span_spelled: torch.Tensor  # [B, T] bytes of that last source token inside the student's token (0 elsewhere)

    @property
    def coverage(self) -> float:
        """Trained student positions at a shared token boundary."""
        return int(self.aligned.sum()) / max(int(self.trained.sum()), 1)


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
    """Aligns the student's batches with one source's tokenization of the same texts (rule: module docstring).

    `aligner(input_ids, attention_mask, targets)` takes a batch from fusion.data.datamodule.collate. Each
    row's text is rebuilt from the student's tokens and split where the response starts (the first
    trained position's next token); the source tokenizes the prompt and the response apart, as
    `fusion.data.datamodule.encode` builds every row, so a source reads a row as it was trained and
    as it answers: its last prompt token never merges with the answer's first bytes (`=` and `-3`,
    not `=-` and `3`). Each piece's tokenization is cached (up to `cache_size` texts), so epochs
    after the first tokenize nothing. Everything else is vectorized over the batch.
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
        self.student_size = np.array([len(piece) for piece in self.student_text], dtype=np.int64)
        self.source_bytes = token_bytes(source)
        # A copy of the source's backend that reads special-token strings in the text as plain text.
        self.backend = Tokenizer.from_str(fast_backend(source).to_str())
        self.backend.no_truncation()
        self.backend.no_padding()
        self.backend.encode_special_tokens = True
        self.cache: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.cache_size = cache_size

    def source_tokens(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per text: the source's ids and each token's byte start and end in the text."""
        todo = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if len(self.cache) + len(todo) > self.cache_size:
            self.cache.clear()
        for text, encoding in zip(todo, self.backend.encode_batch_fast(todo, add_special_tokens=False)):
            ids = encoding.ids
            pieces = [self.source_bytes[i] for i in ids]
            if None in pieces:  # unknown tokens: the text they stand for, read from the offsets
                offsets = self.backend.encode(text, add_special_tokens=False).offsets
                pieces = [p if p is not None else text[s:e].encode() for p, (s, e) in zip(pieces, offsets)]
            data = text.encode()
            spelled = b"".join(pieces)
            if spelled not in (data, b" " + data):
                raise ValueError(
                    f"source tokenizer {self.source_name!r}: its tokens of {text!r} spell {spelled!r}; alignment "
                    "needs a source whose tokens spell the text (no normalizer that changes it)"
                )
            ends = np.cumsum([len(p) for p in pieces], dtype=np.int64)
            ends -= len(spelled) - len(data)  # a dummy prefix space (SentencePiece, add_prefix_space) is not text
            starts = np.concatenate(([0], ends[:-1]))[: len(ends)].astype(np.int64)  # none for an empty text
            self.cache[text] = (np.array(ids, dtype=np.int64), np.maximum(starts, 0), np.maximum(ends, 0))
        return [self.cache[text] for text in texts]

    def _split_tokens(self, texts: list[bytes], split: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per row: the source's tokens of the text before `split` and of the text from it on, one
        after the other, with byte offsets in the whole text."""
        heads = self.source_tokens([data[:cut].decode() for data, cut in zip(texts, split.tolist())])
        tails = self.source_tokens([data[cut:].decode() for data, cut in zip(texts, split.tolist())])
        return [
            (np.concatenate((h[0], t[0])), np.concatenate((h[1], t[1] + cut)), np.concatenate((h[2], t[2] + cut)))
            for h, t, cut in zip(heads, tails, split.tolist())
        ]

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor) -> AlignedBatch:
        ids = input_ids.cpu().numpy()  # [B, T]
        batch, length = ids.shape
        rows = np.arange(batch)
        lengths = attention_mask.cpu().numpy().sum(1)
        valid = np.arange(length) < lengths[:, None]  # [B, T]
        last = np.maximum(lengths - 1, 0)
        has_bos = (lengths > 1) & (ids[:, 0] == (-1 if self.student_bos is None else self.student_bos))
        has_eos = (lengths > 1) & (ids[rows, last] == (-1 if self.student_eos is None else self.student_eos))
        is_text = valid.copy()  # [B, T] tokens that spell text: not the leading bos, not the final eos
        is_text[:, 0] &= ~has_bos
        is_text[rows, last] &= ~has_eos

        # The student's side: each row's text and the byte where each of its tokens starts.
        sizes = np.where(is_text, self.student_size[ids], 0)  # [B, T]
        starts = sizes.cumsum(1) - sizes  # [B, T]
        texts, trim, text_size = [], np.zeros(batch, dtype=np.int64), np.zeros(batch, dtype=np.int64)
        id_rows = ids.tolist()
        for b in range(batch):
            data = b"".join([self.student_text[i] for i in id_rows[b][int(has_bos[b]) : int(last[b]) + 1 - int(has_eos[b])]])
            trim[b], end = _utf8_span(data)
            text_size[b] = end - trim[b]
            texts.append(data[trim[b] : end])
        starts -= trim[:, None]
        starts[rows[has_eos], last[has_eos]] = text_size[has_eos]
        # The response starts at the byte of the token the first trained position predicts.
        trained = valid & (targets.cpu().numpy() != IGNORE_INDEX)  # [B, T]
        first_trained = trained.argmax(1)
        response_start = np.where(trained.any(1), starts[rows, np.minimum(first_trained + 1, length - 1)], np.iinfo(np.int64).max)

        # The source's side: [bos] prompt tokens, response tokens [eos], flattened over the batch ([M] arrays).
        entries = self._split_tokens(texts, np.clip(response_start, 0, text_size))
        offset = int(self.source_bos is not None)
        counts = np.array([len(e[0]) for e in entries], dtype=np.int64)
        add_eos = has_eos & (self.source_eos is not None)
        source_length = offset + counts + add_eos  # [B]
        token_row = np.repeat(rows, counts)  # [M]
        token_col = offset + np.arange(counts.sum()) - np.repeat(counts.cumsum() - counts, counts)  # [M]
        token_ids, token_starts, token_ends = (np.concatenate([e[n] for e in entries] + [np.zeros(0, np.int64)]) for n in range(3))

        # first[base[b] + c]: the source column of row b's first token starting at byte c, or -1.
        base = np.concatenate(([0], (text_size + 1).cumsum()[:-1]))
        first = np.full(int((text_size + 1).sum()), -1, dtype=np.int64)
        # np.unique's return_index is the index of each value's first occurrence (a defined order,
        # unlike repeated fancy-index assignment); tokens are in text order within a row.
        keys, first_index = np.unique(base[token_row] + token_starts, return_index=True)
        first[keys] = token_col[first_index]
        following = starts[:, 1:]  # [B, T-1] byte where the token each position predicts starts
        inside = is_text[:, 1:] & (following >= 0) & (following < text_size[:, None])
        source_next = np.where(inside, first[base[:, None] + np.clip(following, 0, text_size[:, None])], -1)
        eos_rows = rows[has_eos]  # the position predicting eos: the one predicting the source's eos
        source_next[eos_rows, last[eos_rows] - 1] = np.where(add_eos[eos_rows], source_length[eos_rows] - 1, -1)
        position_map = np.full((batch, length), UNALIGNED, dtype=np.int64)
        position_map[:, :-1] = np.where(source_next >= 1, source_next - 1, UNALIGNED)

        # Inside a source token: the column of the token covering byte c, and how far into it c is.
        token_sizes = token_ends - token_starts  # [M] bytes per token (0 for a dummy prefix space)
        covered = (
            np.repeat(base[token_row] + token_starts, token_sizes)
            + np.arange(token_sizes.sum())
            - np.repeat(token_sizes.cumsum() - token_sizes, token_sizes)
        )
        covering = np.full(len(first), -1, dtype=np.int64)
        covering[covered] = np.repeat(np.arange(len(token_col)), token_sizes)  # index into the [M] arrays
        token = np.where(inside & (source_next < 0), covering[base[:, None] + np.clip(following, 0, text_size[:, None])], -1)
        inside_position = np.full((batch, length), UNALIGNED, dtype=np.int64)
        inside_offset = np.zeros((batch, length), dtype=np.int64)
        if len(token_col):
            column = token_col[np.maximum(token, 0)]
            token = np.where((token >= 0) & (column >= 1), token, -1)  # column 0 is predicted by nothing
            inside_position[:, :-1] = np.where(token >= 0, column - 1, UNALIGNED)
            inside_offset[:, :-1] = np.where(token >= 0, following - token_starts[np.maximum(token, 0)], 0)

        # A student token spanning several source tokens, from a shared boundary: the source
        # position predicting the last of them, and that token's bytes inside the student token.
        span_last = np.full((batch, length), UNALIGNED, dtype=np.int64)
        span_spelled = np.zeros((batch, length), dtype=np.int64)
        end = following + sizes[:, 1:]  # [B, T-1] byte after the predicted student token
        spans = (position_map[:, :-1] >= 0) & inside & (end <= text_size[:, None]) & (sizes[:, 1:] > 0)
        if len(token_col) and spans.any():
            holder = covering[base[:, None] + np.clip(end - 1, 0, text_size[:, None])]  # the token holding the last byte
            column = token_col[np.maximum(holder, 0)]
            spans &= (holder >= 0) & (column > position_map[:, :-1] + 1)
            span_last[:, :-1] = np.where(spans, column - 1, UNALIGNED)
            span_spelled[:, :-1] = np.where(spans, end - token_starts[np.maximum(holder, 0)], 0)

        # Source targets: the tokens overlapping [first trained student token, end], eos included.
        width = int(source_length.max())
        source_ids = np.full((batch, width), self.source_pad, dtype=np.int64)
        source_targets = np.full((batch, width), IGNORE_INDEX, dtype=np.int64)
        source_ids[token_row, token_col] = token_ids
        keep = (token_ends > response_start[token_row]) & (token_col >= 1)  # column 0 is predicted by nothing
        source_targets[token_row[keep], token_col[keep] - 1] = token_ids[keep]
        if offset:
            source_ids[:, 0] = self.source_bos
        eos_rows = rows[add_eos]
        source_ids[eos_rows, source_length[eos_rows] - 1] = self.source_eos
        eos_trained = eos_rows[trained[eos_rows, last[eos_rows] - 1]]
        source_targets[eos_trained, source_length[eos_trained] - 2] = self.source_eos
        return AlignedBatch(
            input_ids=torch.from_numpy(source_ids),
            attention_mask=torch.from_numpy((np.arange(width) < source_length[:, None]).astype(np.int64)),
            targets=torch.from_numpy(source_targets),
            position_map=torch.from_numpy(position_map),
            aligned=torch.from_numpy((trained & (position_map >= 0)).sum(1)),
            trained=torch.from_numpy(trained.sum(1)),
            inside_position=torch.from_numpy(inside_position),
            inside_offset=torch.from_numpy(inside_offset),
            span_last=torch.from_numpy(span_last),
            span_spelled=torch.from_numpy(span_spelled),
        )
