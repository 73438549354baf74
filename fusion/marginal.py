"""A source's distribution over the student's next token where the student's next token starts
inside one of the source's tokens (`model.unaligned: marginal`).

Student position t predicts the student token that starts at byte c. When a source token starts
at c too, the source's distribution at that boundary is carried onto the student's vocabulary by
the vocabulary map (`fusion.vocab_map`). When c falls inside a source token v* that starts at
byte b < c, the source's position before b still knows what comes next: its distribution p over
its tokens, conditioned on the bytes u = text[b:c] it has already spelled, is a distribution over
the bytes that follow c:

    P(next bytes begin with s | u) = P(tokens beginning with u + s) / P(tokens beginning with u)

Sorting the source vocabulary by bytes makes "the tokens beginning with u" one contiguous range
of ranks [lo, hi) (two binary searches, memoized per (v*, len u)). Each token v = u + r of the
range with r non-empty gives its conditional mass p(v) / P(u...) to the student token that
spells the longest prefix of r (`rest`): for a character student, r's first character, so the
result is the exact next-character marginal. Tokens equal to u (the source would put a boundary
at c) stay in the denominator and their mass is the target's tail: what follows them is the
next source position's distribution, conditioned on a token the text did not take.

What is kept and what is approximated, next to the exact byte-level probabilities of Phan et al.
(2024) and ALM (Minixhofer et al. 2025): kept exactly, every source token that spells u and goes
on past c, with its probability at b; approximated, (1) the tokenizations that put a source
boundary strictly inside u (non-canonical for this text: the source's own tokenizer spelled u
inside one token) are left out of both the numerator and the denominator, and (2) the tokens
equal to u (a boundary exactly at c) become tail instead of being expanded through another
forward. With a multi-byte student token, the student token a remainder r lands on is the
longest student token that spells a prefix of r; the student's tokenizer might end its token
elsewhere depending on the text after r.

The other way round, a student token y spanning several source tokens from a shared boundary
(a GPT-2 student, a character source): the source's distribution at the boundary is carried by
the vocabulary map, and y gets P(the source spells y) along the text, the product of the
source's probabilities of the tokens inside y with the last one's prefix mass, moved from the
student token y's first source token landed on (`move_mass`). Only the gold path is expanded:
other multi-token student tokens get no such mass.
"""

from __future__ import annotations

import bisect
import math

import numpy as np
import torch

from fusion.vocab_map import DROPPED, merge_by_student_id


class TokenPrefixes:
    """The source vocabulary sorted by bytes, and where each remainder lands in the student's.

    `rank[v]`: v's place in byte order (-1 for specials and output rows past the tokenizer, which
    no range holds); `length[v]`: its bytes. `rest[offset[v] + l]`: the student token spelling the
    longest prefix of v's bytes from l on (-1 when none does).
    """

    def __init__(self, source_bytes: list[bytes | None], student_bytes: list[bytes | None], rows: int):
        pieces = list(source_bytes) + [None] * (rows - len(source_bytes))
        order = sorted((p, v) for v, p in enumerate(pieces) if p)
        self.sorted_bytes = [p for p, _ in order]
        rank = np.full(rows, -1, dtype=np.int32)
        rank[[v for _, v in order]] = np.arange(len(order))
        length = np.array([len(p) if p else 0 for p in pieces], dtype=np.int64)
        student: dict[bytes, int] = {}
        for i, piece in enumerate(student_bytes):  # the lowest id of several spelling the same bytes
            if piece:
                student.setdefault(piece, i)
        longest = max(map(len, student))
        rest = np.full(int(length.sum()), DROPPED, dtype=np.int64)
        offset = np.concatenate(([0], length.cumsum()[:-1]))
        for v, piece in enumerate(pieces):
            for l in range(len(piece) if piece else 0):
                for n in range(min(longest, len(piece) - l), 0, -1):
                    found = student.get(piece[l : l + n])
                    if found is not None:
                        rest[offset[v] + l] = found
                        break
        self.pieces = pieces
        self.rank, self.length = torch.from_numpy(rank), torch.from_numpy(length.astype(np.int32))
        self.offset, self.rest = torch.from_numpy(offset), torch.from_numpy(rest)
        self._ranges: dict[tuple[int, int], tuple[int, int]] = {}

    def to(self, device: torch.device) -> "TokenPrefixes":
        self.rank, self.length, self.offset, self.rest = (t.to(device) for t in (self.rank, self.length, self.offset, self.rest))
        return self

    def prefix_range(self, token: int, spelled: int) -> tuple[int, int]:
        """Ranks [lo, hi) of the tokens whose bytes begin with the first `spelled` bytes of `token`."""
        key = (token, spelled)
        if key not in self._ranges:
            prefix = self.pieces[token][:spelled]
            after = _successor(prefix)
            high = bisect.bisect_left(self.sorted_bytes, after) if after is not None else len(self.sorted_bytes)
            self._ranges[key] = (bisect.bisect_left(self.sorted_bytes, prefix), high)
        return self._ranges[key]

    def conditional(self, logprobs: torch.Tensor, tokens: torch.Tensor, spelled: torch.Tensor) -> torch.Tensor:
        """log P(v | the source has spelled the first `spelled` bytes of `tokens`) for every v that
        goes on past them, -inf for the others. logprobs [P, V_source], tokens [P], spelled [P] (>= 1)
        """
        bounds = torch.tensor([self.prefix_range(v, l) for v, l in zip(tokens.tolist(), spelled.tolist())],
                              dtype=torch.int32, device=logprobs.device).reshape(-1, 2)
        rank, length = self.rank[: logprobs.shape[-1]], self.length[: logprobs.shape[-1]]
        outside = (rank < bounds[:, :1]) | (rank >= bounds[:, 1:])  # [P, V]: tokens not beginning with u
        conditional = logprobs.float().masked_fill(outside, -math.inf)
        # log P(tokens beginning with u): log-probabilities are normalized, so a plain sum of
        # exponentials is safe unless every such token is below float32's range (then: no mass).
        given = conditional.exp().sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny).log()
        conditional -= given
        return conditional.masked_fill_(length <= spelled.to(torch.int32)[:, None], -math.inf)  # tokens equal to u: the tail

    def log_mass(self, logprobs: torch.Tensor, tokens: torch.Tensor, spelled: torch.Tensor) -> torch.Tensor:
        """log P(tokens beginning with the first `spelled` bytes of `tokens`). [P, V_source], [P], [P] -> [P]"""
        bounds = torch.tensor([self.prefix_range(v, l) for v, l in zip(tokens.tolist(), spelled.tolist())],
                              dtype=torch.int32, device=logprobs.device).reshape(-1, 2)
        rank = self.rank[: logprobs.shape[-1]]
        outside = (rank < bounds[:, :1]) | (rank >= bounds[:, 1:])
        return torch.logsumexp(logprobs.float().masked_fill(outside, -math.inf), dim=-1)

    def landing(self, candidates: torch.Tensor, spelled: torch.Tensor) -> torch.Tensor:
        """The student token each candidate's remainder (its bytes after the first `spelled`) lands
        on. candidates [P, W] source ids that go on past `spelled` [P] -> [P, W] student ids"""
        return self.rest[(self.offset[candidates] + spelled[:, None]).clamp(max=len(self.rest) - 1)]


def _successor(prefix: bytes) -> bytes | None:
    """The smallest byte string greater than every string that begins with `prefix` (None: no such string)."""
    trimmed = prefix.rstrip(b"\xff")
    return trimmed[:-1] + bytes([trimmed[-1] + 1]) if trimmed else None


def move_mass(ids: torch.Tensor, logprobs: torch.Tensor, first: torch.Tensor, spanning: torch.Tensor, log_mass: torch.Tensor,
              k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A student token spanning several source tokens, at a shared boundary: its probability along
    the source tokens it holds (`log_mass` [P]) moves to it (`spanning` [P]) from the student token
    its first source token was carried to (`first` [P]). ids, logprobs [P, K] -> the same, top k."""
    probs = logprobs.exp()
    at_first = ids == first[:, None]
    taken = torch.minimum(probs.masked_fill(~at_first, 0.0).sum(-1), log_mass.exp())  # never more than that entry holds
    probs = torch.where(at_first, (probs - taken[:, None]).clamp(min=0.0), probs)
    candidates = torch.cat([ids, spanning[:, None]], dim=-1)
    return merge_by_student_id(candidates, torch.cat([probs, log_mass.exp()[:, None]], dim=-1).log(), k)


CHUNK_ELEMENTS = 2**22  # [positions, V_source] elements handled at once: a few such tensors stay near 100 MB


def _chunks(logprobs: torch.Tensor) -> range:
    return range(0, len(logprobs), max(1, CHUNK_ELEMENTS // max(logprobs.shape[-1], 1)))


def marginal_topk(prefixes: TokenPrefixes, logprobs: torch.Tensor, tokens: torch.Tensor, spelled: torch.Tensor,
                  k: int, oversample: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely next student tokens inside source tokens: [P, k] ids (-1 empty) and log-probs."""
    ids, values = [], []
    step = _chunks(logprobs).step
    for start in _chunks(logprobs):
        part = slice(start, start + step)
        conditional = prefixes.conditional(logprobs[part], tokens[part], spelled[part])
        top, candidates = conditional.topk(min(conditional.shape[-1], k * oversample), dim=-1)
        chunk_ids, chunk_values = merge_by_student_id(prefixes.landing(candidates, spelled[part]).masked_fill(top.isinf(), DROPPED), top, k)
        ids.append(chunk_ids)
        values.append(chunk_values)
    if not ids:
        return logprobs.new_full((0, k), DROPPED, dtype=torch.long), logprobs.new_full((0, k), -math.inf)
    return torch.cat(ids), torch.cat(values)


def marginal_dense(prefixes: TokenPrefixes, logprobs: torch.Tensor, tokens: torch.Tensor, spelled: torch.Tensor,
                   student_vocab: int) -> torch.Tensor:
    """The whole next-student-token marginal inside source tokens: [P, V_student] log-probs."""
    dense = torch.zeros(len(logprobs), student_vocab, device=logprobs.device)
    step = _chunks(logprobs).step
    for start in _chunks(logprobs):
        part = slice(start, start + step)
        conditional = prefixes.conditional(logprobs[part], tokens[part], spelled[part])
        rows, candidates = conditional.isfinite().nonzero(as_tuple=True)
        student_ids = prefixes.landing(candidates[:, None], spelled[part][rows])[:, 0]
        keep = student_ids != DROPPED
        dense.index_put_((rows[keep] + start, student_ids[keep]), conditional[rows[keep], candidates[keep]].exp(), accumulate=True)
    return dense.log()
