"""`python -m fusion.bench lookahead`: the same text before a position, another token written
there; an exact target does not change."""

from __future__ import annotations

import random

import pytest
import torch

from fusion.bench.lookahead import BOUNDARIES, _changed_rows, measure, total_variation
from fusion.data import IGNORE_INDEX
from fusion.data.datamodule import collate, encode
from fusion.data.tokenizer import build_char_tokenizer
from fusion.sources.pool import SourcePool
from tests.test_alignment import byte_bpe
from tests.test_marginal import FixedSource

PROBS = {"hello": 0.5, "help": 0.2, "he": 0.1, "w": 0.2}


def test_total_variation_counts_the_tail_as_one_bucket():
    assert total_variation({1: 0.5, 2: 0.5}, {1: 0.5, 2: 0.5}) == 0.0
    assert total_variation({1: 0.8, 2: 0.2}, {1: 0.2, 3: 0.8}) == pytest.approx(0.8)
    # {l: 0.875} + tail 0.125 against {l: 0.875, h: 0.1, w: 0.025}: the tail's mass, spelled out.
    assert total_variation({1: 0.875}, {1: 0.875, 2: 0.1, 3: 0.025}) == pytest.approx(0.125)


def test_changed_rows_write_another_answer_token_at_one_position():
    char = build_char_tokenizer()
    batch = collate([encode(char, "x", answer, 32) | {"row": {}} for answer in ("hello", "hew")], char.pad_token_id)
    both, changed = _changed_rows(batch, 3, random.Random(0))
    assert len(changed) == 3 + 3  # "hew" has three answer positions before the eos, each changed
    for copy, (row, position) in enumerate(changed, start=2):
        differ = (both["input_ids"][copy] != batch["input_ids"][row]).nonzero().flatten().tolist()
        assert differ == [position + 1]
        assert (both["targets"][copy] != batch["targets"][row]).nonzero().flatten().tolist() == [position]
        answer = set(batch["targets"][row][batch["targets"][row] != IGNORE_INDEX].tolist())
        assert int(both["targets"][copy, position]) in answer - {int(batch["targets"][row, position])}


def test_a_source_with_the_students_tokenizer_never_reads_the_written_token():
    """The char source splits every text where the student does: TV 0 at every changed position.
    The byte-BPE source ("he", "hel", "hello" as tokens) reads "hew" as "he" + "w": where the
    token ends decides its distribution there unless `prefix` reads it from the text before."""
    char = build_char_tokenizer()
    source = byte_bpe([("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("he", "l"), ("hel", "p")])
    pool = SourcePool(
        [FixedSource(char, {"h": 0.5, "e": 0.3, "w": 0.2}), FixedSource(source, PROBS)],
        [char, source],
        ["same", "bpe"],
        char,
        top_k=8,
        unaligned="marginal",
    )
    rows = [encode(char, "x", answer, 32) | {"row": {}} for answer in ("hello", "hew", "help", "hewhe", "hehe")]
    batch = collate(rows, char.pad_token_id)
    got = measure(pool, [batch], per_row=5, student=char, seed=0)
    assert len(got["same"]["token_end"]) == len(got["same"]["prefix"]) == 5 + 3 + 4 + 5 + 4
    assert max(tv for tv, _ in got["same"]["token_end"] + got["same"]["prefix"]) == 0.0
    assert not any(split for _, split in got["same"]["prefix"])  # one char, one token: nothing to split
    token_end, prefix = (torch.tensor([tv for tv, _ in got["bpe"][b]]) for b in ("token_end", "prefix"))
    assert len(token_end) == len(prefix) == 5 + 3 + 4 + 5 + 4
    # token_end: 12 of the 21 changes move the whole target (a boundary where the other row has
    # none, or none where it has one). prefix: what is left is the 0.125 of "he" ending after "he"
    # (spelled out as the boundary's h 0.1 and w 0.025 where the source splits there, tail elsewhere).
    assert int((token_end == 1.0).sum()) == 12 and int((token_end > 0).sum()) == 12
    assert sorted(set(prefix.tolist())) == [0.0, pytest.approx(0.125)] and int((prefix > 0).sum()) == 2
    # Every difference is where the written token moves the source's split of the text before it.
    split = [s for _, s in got["bpe"]["token_end"]]
    assert split == [s for _, s in got["bpe"]["prefix"]] and (token_end > 0).tolist() == split
    assert all(s for tv, s in got["bpe"]["prefix"] if tv > 0)


def test_every_boundary_is_measured_whatever_the_pools_own_and_the_pool_keeps_it():
    """`measure` reads each source at each boundary in turn (token_end, then prefix), so its
    results do not depend on the `boundary` the pool came with; it hands the pool back with that
    setting, also when a source fails halfway."""
    char = build_char_tokenizer()
    source = byte_bpe([("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("he", "l"), ("hel", "p")])
    rows = [encode(char, "x", answer, 32) | {"row": {}} for answer in ("hello", "hew", "help")]
    batch = collate(rows, char.pad_token_id)

    def pool(boundary: str) -> SourcePool:
        models = [FixedSource(char, {"h": 0.5, "e": 0.3, "w": 0.2}), FixedSource(source, PROBS)]
        return SourcePool(models, [char, source], ["same", "bpe"], char, top_k=8, unaligned="marginal", boundary=boundary)

    results = {}
    for own in ("prefix", "token_end"):
        measured, read = pool(own), []
        original = measured.run

        def run(selected, *args, _pool=measured, _run=original, **kwargs):
            read.append((int(selected[0, 0]), _pool.boundary))  # (source, the boundary it is read at)
            return _run(selected, *args, **kwargs)

        measured.run = run
        results[own] = measure(measured, [batch], per_row=5, student=char, seed=0)
        assert read == [(0, "token_end"), (0, "prefix"), (1, "token_end"), (1, "prefix")]
        assert measured.boundary == own
    assert results["prefix"] == results["token_end"]
    bpe = {b: [tv for tv, _ in results["prefix"]["bpe"][b]] for b in BOUNDARIES}
    # Each answer position but the eos changed once (5 + 3 + 4): at token_end 8 changes move the
    # whole target (TV 1); at the prefix only the 0.125 of "he" ending after "he" is left, twice.
    assert sorted(bpe["token_end"]) == [0.0] * 4 + [1.0] * 8
    assert sorted(bpe["prefix"]) == [0.0] * 10 + [pytest.approx(0.125)] * 2
    assert all(tv == 0.0 for b in BOUNDARIES for tv, _ in results["prefix"]["same"][b]) and len(results["prefix"]["same"]["prefix"]) == 12
    # A source that fails while read at the prefix: the error propagates, the pool keeps its own setting.
    failing = pool("token_end")
    original = failing.run

    def fail_at_prefix(selected, *args, **kwargs):
        if failing.boundary == "prefix":
            raise RuntimeError("source failed")
        return original(selected, *args, **kwargs)

    failing.run = fail_at_prefix
    with pytest.raises(RuntimeError, match="source failed"):
        measure(failing, [batch], per_row=5, student=char, seed=0)
    assert failing.boundary == "token_end"
