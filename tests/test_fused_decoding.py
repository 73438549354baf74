"""The fused teacher's greedy decoding against answers computed by hand or by the sources alone."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from fusion.data.tokenizer import build_char_tokenizer
from fusion.sources.fused_decoding import fused_greedy
from fusion.sources.pool import SourcePool
from fusion.stages.answers import FUSED_WRITER, write_answers
from fusion.stages.fusion_settings import FusionSettings
from tests.test_alignment import SlowChar, byte_bpe


class TableSource(torch.nn.Module):
    """A source whose next-token distribution depends on the current token only: `table` maps an
    input token to {next token: probability}; any other input gives `default`."""

    def __init__(self, tokenizer, table: dict[str, dict[str, float]], default: dict[str, float]):
        super().__init__()
        self.head = torch.nn.Linear(1, len(tokenizer), bias=False)
        self.logits = torch.full((len(tokenizer), len(tokenizer)), -1e4)
        for row in range(len(tokenizer)):
            token = tokenizer.convert_ids_to_tokens(row)
            for following, p in table.get(token, default).items():
                self.logits[row, tokenizer.convert_tokens_to_ids(following)] = math.log(p)

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask, logits_to_keep):
        return SimpleNamespace(logits=self.logits[input_ids[logits_to_keep]])


@pytest.fixture(scope="module")
def char():
    return build_char_tokenizer()


def fused(char, sources, weights, prompts=("8=",), max_new_tokens=6, tokenizers=None):
    pool = SourcePool(
        sources,
        tokenizers or [char] * len(sources),
        [f"s{i}" for i in range(len(sources))],
        char,
        top_k=8,
        unaligned="marginal",
        boundary="prefix",
    )
    k = len(sources)
    selected = torch.arange(k).repeat(len(prompts), 1)
    return fused_greedy(pool, list(prompts), selected, torch.tensor([weights] * len(prompts)), char, max_new_tokens)


def test_one_source_is_its_own_greedy_answer(char):
    """A source alone, or two copies of it at any weights, answers what its table spells greedily."""
    table = {"=": {"4": 0.6, "-": 0.4}, "4": {"2": 0.7, "<eos>": 0.3}, "2": {"<eos>": 0.9, "4": 0.1}}
    source = TableSource(char, table, {"<eos>": 1.0})
    answers, record = fused(char, [source], [1.0])
    assert answers == ["42"] and record == {"steps": 3, "renormalised": 0, "source_forwards_per_token": 1, "renormalised_per_prompt": [0]}
    assert fused(char, [source, source], [0.2, 0.8])[0] == ["42"]


def test_the_mixture_decides_where_the_sources_disagree(char):
    """At `=` one source says 4 (0.6) or 7 (0.4), the other 7 (0.9) or 4 (0.1): with weights 0.5 and
    0.5 the mixture gives 7 0.65 against 4 0.35; with 0.9 and 0.1, 4 0.55 against 7 0.45."""
    a = TableSource(char, {"=": {"4": 0.6, "7": 0.4}}, {"<eos>": 1.0})
    b = TableSource(char, {"=": {"7": 0.9, "4": 0.1}}, {"<eos>": 1.0})
    assert fused(char, [a, b], [0.5, 0.5])[0] == ["7"]
    assert fused(char, [a, b], [0.9, 0.1])[0] == ["4"]
    assert fused(char, [a, b], [1.0, 0.0])[0] == ["4"]  # a weight of zero leaves the source out
    assert fused(char, [a], [1.0])[0] == ["4"] and fused(char, [b], [1.0])[0] == ["7"]


def test_a_source_with_nothing_to_say_is_left_out_and_counted(char):
    """Source a gives non-finite logits after `=`, so on that text it has no distribution: each step
    fuses b alone (7, then eos), and both steps count as renormalised for the prompt."""
    a = TableSource(char, {"=": {"4": 1.0}}, {"<eos>": 1.0})
    a.logits[char.convert_tokens_to_ids("=")] = float("nan")
    b = TableSource(char, {"=": {"7": 0.9, "4": 0.1}}, {"<eos>": 1.0})
    answers, record = fused(char, [a, b], [0.5, 0.5])
    assert answers == ["7"] and record["renormalised"] == 2 and record["renormalised_per_prompt"] == [2]


def test_a_source_with_another_tokenizer_is_read_from_the_prompt_end(char):
    """A BPE source that merges `=` and `-` (never inside a training row, where the prompt and the
    response are tokenized apart) answers `8=` with `0` at 0.9. Its position before `=` is a
    prompt position that nothing trained, and says `=-` as often as `=`: reading the answer's
    first character from there would give `-` (0.5 + 0.5 * 0.1 = 0.55)."""
    bpe = byte_bpe([("=", "-")])
    table = {"=": {"0": 0.9, "-": 0.1}, "8": {"=": 0.5, "=-": 0.5}, "0": {"<eos>": 1.0}}
    source = TableSource(bpe, table, {"<eos>": 1.0})
    answers, record = fused(char, [source], [1.0], tokenizers=[bpe])
    assert answers == ["0"] and record["renormalised"] == 0


def test_bad_settings_are_refused(char):
    source = TableSource(char, {}, {"<eos>": 1.0})
    pool = SourcePool([source], [char], ["s"], char, unaligned="mask")
    with pytest.raises(ValueError, match="unaligned='marginal' and boundary='prefix'"):
        fused_greedy(pool, ["8="], torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1), char, 4)
    with pytest.raises(ValueError, match="non-negative with a positive sum"):
        fused(char, [source, source], [0.0, 0.0])


def test_a_source_without_byte_offsets_is_refused_by_name_before_any_step(char):
    """A slow tokenizer has no byte offsets to align by: the pool refuses it when built, naming the
    source's key and tokenizer, so fused decoding never starts."""
    slow = SlowChar(name_or_path="zoo/slow-source")
    source = TableSource(char, {}, {"<eos>": 1.0})
    with pytest.raises(ValueError, match=r"model.sources\[1\]: tokenizer 'zoo/slow-source'.*fast tokenizer"):
        SourcePool([source, source], [char, slow], ["s0", "s1"], char, unaligned="marginal", boundary="prefix")


def test_a_pool_read_another_way_shares_its_models(char):
    """`reading` gives the training pool's sources (`mask`, `token_end`) read from the text so far:
    the BPE source of the test above answers `0` through it, as through a pool built so, and the
    training pool keeps its own settings."""
    bpe = byte_bpe([("=", "-")])
    source = TableSource(bpe, {"=": {"0": 0.9, "-": 0.1}, "8": {"=": 0.5, "=-": 0.5}, "0": {"<eos>": 1.0}}, {"<eos>": 1.0})
    pool = SourcePool([source], [bpe], ["s0"], char, top_k=8, unaligned="mask", boundary="token_end")
    view = pool.reading("marginal", "prefix")
    answers, _ = fused_greedy(view, ["8="], torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1), char, 6)
    assert answers == ["0"] and view.models[0] is source
    assert (pool.unaligned, pool.boundary, pool.prefixes) == ("mask", "token_end", [None])
    assert pool.reading("marginal", "prefix") is view and pool.reading("mask", "token_end") is pool


def test_fused_answers_are_written_by_the_weighed_sources_together(char):
    """`answer_from: fused`: each prompt's weighed sources decode together with equal weights. At
    `=`: a says 4 (0.6) or 7 (0.4), b says 7 (0.9), and c, a distractor, says 9 (1.0). Prompt 1
    weighs a and b: 7 (0.65). Prompt 2 weighs a alone: 4. Prompt 3 weighs all three: 7 (0.43)
    over 9 (0.33) and 4 (0.23). Writer -2 (the sources together), one generation per weighed
    source."""
    a = TableSource(char, {"=": {"4": 0.6, "7": 0.4}}, {"<eos>": 1.0})
    b = TableSource(char, {"=": {"7": 0.9, "4": 0.1}}, {"<eos>": 1.0})
    c = TableSource(char, {"=": {"9": 1.0}}, {"<eos>": 1.0})
    pool = SourcePool([a, b, c], [char] * 3, ["a", "b", "c"], char, top_k=8, unaligned="mask")
    settings = FusionSettings(
        sources=["zoo/a", "zoo/b", "zoo/c"], fusion="selector", top_k=3, answer_from="fused", response_max_new_tokens=4
    )
    rows = [{"prompt": p, "response": None} for p in ("1=", "2=", "3=")]
    sources = [[0, 1, 2], [0, 2, 1], [2, 1, 0]]
    weighed = [[True, True, False], [True, False, False], [True, True, True]]
    answers = write_answers(rows, sources, pool, char, settings, weighed)
    assert [a["text"] for a in answers] == ["7", "4", "7"]
    assert [(a["writer"], a["generations"], a["sources"]) for a in answers] == [
        (FUSED_WRITER, 2, [0, 1, 2]),
        (FUSED_WRITER, 1, [0, 2, 1]),
        (FUSED_WRITER, 3, [2, 1, 0]),
    ]
