"""A source's distribution over the student's next token where the student's next token starts
inside one of the source's tokens (`model.unaligned: marginal`).

Student position t predicts the student token that starts at byte c. When a source token starts
at c too, the source's distribution at that boundary is carried onto the student's vocabulary by
the vocabulary map (`fusion.sources.vocab_map`). When c falls inside a source token v* that starts at
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

At a shared boundary the source's next-token distribution assumes its token v* ended there,
which the text decided by what follows c: along a gold answer that is the truth, but along the
student's own sample it lets the sample's next token choose its own target (a wrong student token
can end v* early, and the source then predicts what follows a finished v*). With
`boundary: prefix` the position is read from the text before c only: the source's position
before v*, u = all of v*'s bytes, the tokens that go on past u as above, plus the token equal to
u with its probability times the boundary's distribution (`ended`): P(x | u) = sum_{v = u + r}
p(v) [r lands on x] / P(u...) + p(u) / P(u...) * P_boundary(x). That is the exact next-token
distribution along the source's canonical split before v*, and it expands the term (2) above
where the forward after u exists. At the response's first byte the boundary is certain (the
prompt and the response are tokenized apart) and the `token_end` read is exact: the position
before the prompt's last token was never trained (`SourcePool._source_view`).

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

from fusion.sources.vocab_map import DROPPED, merge_by_student_id


class TokenPrefixes:
    """The source vocabulary sorted by bytes, and where each remainder lands in the student's.

    `sorted_ids`: the tokens in byte order (specials and output rows past the tokenizer are in no
    range); `length[v]`: v's bytes. `rest[offset[v] + l]`: the student token spelling the
    longest prefix of v's bytes from l on (-1 when none does).
    """

    def __init__(self, source_bytes: list[bytes | None], student_bytes: list[bytes | None], rows: int):
        pieces = list(source_bytes) + [None] * (rows - len(source_bytes))
        order = sorted((p, v) for v, p in enumerate(pieces) if p)
        self.sorted_bytes = [p for p, _ in order]
        # Padded with as many entries again, so that any window starting inside the order can be read.
        self.sorted_ids = torch.tensor([v for _, v in order] * 2, dtype=torch.long)
        length = np.array([len(p) if p else 0 for p in pieces], dtype=np.int64)
        student: dict[bytes, int] = {}
        for i, piece in enumerate(student_bytes):  # the lowest id of several spelling the same bytes
            if piece:
                student.setdefault(piece, i)
        longest = max(map(len, student))
        rest = np.full(int(length.sum()), DROPPED, dtype=np.int64)
        offset = np.concatenate(([0], length.cumsum()[:-1]))
        for v, piece in enumerate(pieces):
            for start in range(len(piece) if piece else 0):
                for n in range(min(longest, len(piece) - start), 0, -1):
                    found = student.get(piece[start : start + n])
                    if found is not None:
                        rest[offset[v] + start] = found
                        break
        self.pieces = pieces
        self.length = torch.from_numpy(length)
        self.offset, self.rest = torch.from_numpy(offset), torch.from_numpy(rest)
        self._ranges: dict[tuple[int, int], tuple[int, int]] = {}

    def to(self, device: torch.device) -> TokenPrefixes:
        self.length, self.offset, self.rest, self.sorted_ids = (
            t.to(device) for t in (self.length, self.offset, self.rest, self.sorted_ids)
        )
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

    def bounds(self, tokens: torch.Tensor, spelled: torch.Tensor) -> torch.Tensor:
        """[P, 2] rank ranges [lo, hi) of the tokens beginning with the first `spelled` bytes of `tokens`."""
        pairs = [self.prefix_range(v, n) for v, n in zip(tokens.tolist(), spelled.tolist())]
        return torch.tensor(pairs, dtype=torch.long, device=tokens.device).reshape(-1, 2)

    def ranges(self, logprobs: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor, spelled: torch.Tensor):
        """The tokens beginning with the spelled bytes u of each position, read as one window of the
        byte order per position (position i's distribution is `logprobs[rows[i]]`). Positions of
        similar range width go together, so the work is the ranges' total size, not [P, V].

        Yields (positions [b], candidates [b, w] source ids, their log-probs [b, w] with -inf past
        each range's end and on a token equal to u, log P(tokens beginning with u) [b]). A token
        equal to u is the first of its range in byte order; it counts in the total only.
        """
        bounds = self.bounds(tokens, spelled)
        widths = bounds[:, 1] - bounds[:, 0]
        # Widths within a factor 2 share a window; those up to MIN_WINDOW share one (fewer, larger steps).
        level = torch.ceil(torch.log2(widths.clamp(min=MIN_WINDOW).double())).long()
        for value in level.unique().tolist():
            positions = (level == value).nonzero(as_tuple=True)[0]
            width = int(widths[positions].max())
            if width == 0:
                continue
            offsets = torch.arange(width, device=logprobs.device)
            windows = self.sorted_ids.unfold(0, width, 1)  # [n, w] view: row lo is the window from lo (padded past the end)
            flat = logprobs.reshape(-1)
            for part in positions.split(max(1, CHUNK_ELEMENTS // width)):
                candidates = windows[bounds[part, 0]]  # [b, w]
                values = flat.take(candidates + (rows[part] * logprobs.shape[-1])[:, None]).float()
                values = values.masked_fill(offsets >= widths[part, None], -math.inf)
                # Normalized log-probabilities: a plain sum of exponentials cannot overflow; where
                # it underflows (every token below float32's range) logsumexp takes over.
                mass = values.exp().sum(-1)
                total = mass.log()
                if bool((mass == 0).any()):
                    total[mass == 0] = torch.logsumexp(values[mass == 0], dim=-1)
                equal = self.length[candidates[:, 0]] == spelled[part]
                values[:, 0] = torch.where(equal, -math.inf, values[:, 0])
                yield part, candidates, values, total

    def log_mass(self, logprobs: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor, spelled: torch.Tensor) -> torch.Tensor:
        """log P(tokens beginning with the first `spelled` bytes of `tokens`), position i read from
        `logprobs[rows[i]]`. -> [P]"""
        mass = torch.full((len(rows),), -math.inf, device=logprobs.device)
        for part, _, _, total in self.ranges(logprobs, rows, tokens, spelled):
            mass[part] = total
        return mass

    def landing(self, candidates: torch.Tensor, spelled: torch.Tensor) -> torch.Tensor:
        """The student token each candidate's remainder (its bytes after the first `spelled`) lands
        on. candidates [P, W] source ids that go on past `spelled` [P] -> [P, W] student ids"""
        return self.rest[(self.offset[candidates] + spelled[:, None]).clamp(max=len(self.rest) - 1)]


def _successor(prefix: bytes) -> bytes | None:
    """The smallest byte string greater than every string that begins with `prefix` (None: no such string)."""
    trimmed = prefix.rstrip(b"\xff")
    return trimmed[:-1] + bytes([trimmed[-1] + 1]) if trimmed else None


def move_mass(
    ids: torch.Tensor, logprobs: torch.Tensor, first: torch.Tensor, spanning: torch.Tensor, log_mass: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A student token spanning several source tokens, at a shared boundary: its probability along
    the source tokens it holds (`log_mass` [P]) moves to it (`spanning` [P]) from the student token
    its first source token was carried to (`first` [P]). ids, logprobs [P, K] -> the same, top k."""
    probs = logprobs.exp()
    at_first = ids == first[:, None]
    taken = torch.minimum(probs.masked_fill(~at_first, 0.0).sum(-1), log_mass.exp())  # never more than that entry holds
    probs = torch.where(at_first, (probs - taken[:, None]).clamp(min=0.0), probs)
    candidates = torch.cat([ids, spanning[:, None]], dim=-1)
    return merge_by_student_id(candidates, torch.cat([probs, log_mass.exp()[:, None]], dim=-1).log(), k)


def move_mass_dense(logprobs: torch.Tensor, first: torch.Tensor, spanning: torch.Tensor, log_mass: torch.Tensor) -> torch.Tensor:
    """`move_mass` on whole distributions: [P, V_student] log-probs -> the same."""
    probs, each = logprobs.exp(), torch.arange(len(logprobs), device=logprobs.device)
    probs[each, first] -= torch.minimum(probs[each, first], log_mass.exp())  # never more than that entry holds
    probs[each, spanning] += log_mass.exp()
    return probs.log()


CHUNK_ELEMENTS = 2**22  # window elements handled at once
MIN_WINDOW = 1024  # ranges narrower than this are read in one window of their largest width


def _finite(total: torch.Tensor) -> torch.Tensor:
    """A range of no mass has only -inf candidates: dividing by its total must leave them -inf, not nan."""
    return total.clamp(min=torch.finfo(total.dtype).min)


def marginal_topk(
    prefixes: TokenPrefixes,
    logprobs: torch.Tensor,
    rows: torch.Tensor,
    tokens: torch.Tensor,
    spelled: torch.Tensor,
    k: int,
    oversample: int = 4,
    ended: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely next student tokens inside source tokens, position i read from
    `logprobs[rows[i]]`: [P, k] ids (-1 empty) and log-probs.

    `ended` (ids, log-probs [P, K]): at a shared boundary read from the prefix (`boundary: prefix`, `SourcePool._run_one`),
    the distribution after the token that ends there, given weight P(that token | u) instead of
    falling into the tail; each position's `spelled` must then be its whole `tokens`.
    """
    ids = torch.full((len(rows), k), DROPPED, dtype=torch.long, device=logprobs.device)
    values = torch.full((len(rows), k), -math.inf, device=logprobs.device)
    if ended is not None:
        ids[:, : ended[0].shape[-1]], values[:, : ended[0].shape[-1]] = ended[0][:, :k], ended[1][:, :k]
    for part, candidates, joint, total in prefixes.ranges(logprobs, rows, tokens, spelled):
        top, order = joint.topk(min(joint.shape[-1], k * oversample), dim=-1)
        landed = prefixes.landing(candidates.gather(1, order), spelled[part]).masked_fill(top.isinf(), DROPPED)
        top = top - _finite(total)[:, None]  # log P(v | u)
        if ended is not None:
            log_end = logprobs[rows[part], tokens[part]] - _finite(total)  # log P(the token equal to u | u)
            landed = torch.cat([landed, ended[0][part]], dim=-1)
            top = torch.cat([top, ended[1][part] + log_end[:, None]], dim=-1)
        ids[part], values[part] = merge_by_student_id(landed, top, k)
    return ids, values


def marginal_dense(
    prefixes: TokenPrefixes,
    logprobs: torch.Tensor,
    rows: torch.Tensor,
    tokens: torch.Tensor,
    spelled: torch.Tensor,
    student_vocab: int,
    ended: torch.Tensor | None = None,
) -> torch.Tensor:
    """The whole next-student-token marginal inside source tokens (position i read from
    `logprobs[rows[i]]`): [P, V_student] log-probs. `ended` [P, V_student] log-probs: as in
    `marginal_topk`, the distribution after the token equal to u, weighted by P(it | u)."""
    dense = torch.zeros(len(rows), student_vocab, device=logprobs.device) if ended is None else ended.exp()
    for part, candidates, joint, total in prefixes.ranges(logprobs, rows, tokens, spelled):
        landed = prefixes.landing(candidates, spelled[part])
        keep = (landed != DROPPED) & joint.isfinite()
        positions = part[:, None].expand_as(landed)
        if ended is not None:
            dense[part] *= (logprobs[rows[part], tokens[part]] - _finite(total)).exp()[:, None]  # P(the token equal to u | u)
        dense.index_put_((positions[keep], landed[keep]), (joint - _finite(total)[:, None])[keep].exp(), accumulate=True)  # P(v | u)
    return dense.log()
