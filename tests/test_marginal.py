"""The `marginal` policy on hand-made strings: a source's distribution read inside its own tokens,
with source probabilities set by hand and the student's next-token distribution computed by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from fusion.data.datamodule import collate, encode
from fusion.data.tokenizer import build_char_tokenizer, build_gpt2_tokenizer, train_bpe_tokenizer
from fusion.sources.alignment import Aligner
from fusion.sources.marginal import TokenPrefixes, _successor
from fusion.sources.pool import SourcePool
from tests.test_alignment import byte_bpe


class FixedSource(torch.nn.Module):
    """A source whose next-token distribution is the same at every position: `probs` (token -> p)."""

    def __init__(self, tokenizer, probs: dict[str, float]):
        super().__init__()
        self.head = torch.nn.Linear(1, len(tokenizer), bias=False)
        self.logits = torch.full((len(tokenizer),), -1e4)
        for token, p in probs.items():
            self.logits[tokenizer.convert_tokens_to_ids(token)] = math.log(p)

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask, logits_to_keep):
        return SimpleNamespace(logits=self.logits.expand(int(logits_to_keep.sum()), -1))


def student_distributions(
    student,
    source,
    probs: dict[str, float],
    prompt: str,
    response: str,
    policy: str = "marginal",
    union: bool = False,
    boundary: str = "token_end",
):
    """Per trained student position: {next student token: probability} from the source, or None.
    `union`: the source twice, on the union of both supports (the online path, whole distributions)."""
    copies = 2 if union else 1
    pool = SourcePool(
        [FixedSource(source, probs)] * copies,
        [source] * copies,
        ["source", "copy"][:copies],
        student,
        top_k=8,
        unaligned=policy,
        boundary=boundary,
    )
    batch = collate([encode(student, prompt, response, 64) | {"row": {}}], student.pad_token_id)
    out = pool.run(torch.arange(copies)[None], batch, union=union)
    trained = (batch["targets"][0] != -100).nonzero().flatten().tolist()
    found = []
    for t in trained:
        if not out.aligned[0, 0, t]:
            found.append(None)
            continue
        ids, logprobs = out.ids[0, 0, t], out.logprobs[0, 0, t]
        found.append({student.convert_ids_to_tokens(int(i)): float(p.exp()) for i, p in zip(ids, logprobs) if i >= 0 and p > -50})
    return found


@pytest.fixture(scope="module")
def char():
    return build_char_tokenizer()


def test_a_source_token_split_over_several_student_positions(char):
    # "hello" is one source token; the character student predicts h, e, l, l, o, eos along it.
    source = byte_bpe([("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("he", "l"), ("hel", "p")])
    probs = {"hello": 0.5, "help": 0.2, "he": 0.1, "w": 0.2}
    got = student_distributions(char, source, probs, "x", "hello")
    # At the shared boundary before "hello": the vocabulary map sends hello, help, he to "h".
    assert got[0] == pytest.approx({"h": 0.8, "w": 0.2})
    assert got[1] == pytest.approx({"e": 1.0})  # given "h": hello, help, he all go on with "e"
    assert got[2] == pytest.approx({"l": 0.7 / 0.8})  # given "he": "he" itself ends here (tail 0.1 / 0.8)
    assert got[3] == pytest.approx({"l": 0.5 / 0.7, "p": 0.2 / 0.7})  # given "hel": hello or help
    whole = student_distributions(char, source, probs, "x", "hello", union=True)  # from whole distributions
    assert all(whole[t] == pytest.approx(got[t]) for t in range(1, 5))
    assert got[4] == pytest.approx({"o": 1.0})  # given "hell"
    # Without the policy those four positions have no distribution from this source.
    assert [g is None for g in student_distributions(char, source, probs, "x", "hello", "mask")] == [False, True, True, True, True, False]


def test_a_shared_boundary_read_from_the_text_before_it(char):
    # "hew" is read "he" + "w": the source token "he" ends where the student predicts "w". Its
    # distribution there ({hello, help, he} -> h 0.8, w 0.2) assumes "he" ended, which only the
    # "w" that follows decided. Read from "he" alone: hello and help go on with "l" (0.7 of the
    # 0.8 beginning with "he"), and "he" ends with 0.1 / 0.8, followed by the boundary's h or w.
    source = byte_bpe([("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("he", "l"), ("hel", "p")])
    assert source.tokenize("xhew") == ["x", "he", "w"]
    probs = {"hello": 0.5, "help": 0.2, "he": 0.1, "w": 0.2}
    token_end = student_distributions(char, source, probs, "x", "hew")
    prefix = student_distributions(char, source, probs, "x", "hew", boundary="prefix")
    assert token_end[2] == pytest.approx({"h": 0.8, "w": 0.2})
    assert prefix[2] == pytest.approx({"l": 0.7 / 0.8, "h": 0.1 / 0.8 * 0.8, "w": 0.1 / 0.8 * 0.2})
    # Where the token that ends has no longer one ("w"; "x", which the source never predicts), and
    # inside "he", both reads agree.
    for t in (0, 1, 3):
        assert prefix[t] == pytest.approx(token_end[t])
    whole = student_distributions(char, source, probs, "x", "hew", union=True, boundary="prefix")  # from whole distributions
    assert all(whole[t] == pytest.approx(prefix[t]) for t in range(4))
    with pytest.raises(
        ValueError,
        match=r"model.boundary must be one of \('token_end', 'prefix'\) \('prefix' reads sources inside their tokens: it needs model.unaligned 'marginal'\), got 'prefix' with unaligned 'mask'",
    ):
        student_distributions(char, source, probs, "x", "hew", policy="mask", boundary="prefix")


def test_multibyte_utf8_inside_a_token():
    # A byte-level student: "é" is two student tokens (0xC3, 0xA9), inside the source token "aé".
    student = byte_bpe([])
    source = byte_bpe([("Ã", "©"), ("a", "Ã©"), ("a", "b")])
    got = student_distributions(student, source, {"aÃ©": 0.6, "ab": 0.4}, "x", "aé")
    assert got[0] == pytest.approx({"a": 1.0})
    assert got[1] == pytest.approx({"Ã": 0.6, "b": 0.4})  # given "a": é's first byte, or b
    assert got[2] == pytest.approx({"©": 1.0})  # given "a" and 0xC3: only "aé" goes on


def test_digits_merged_by_gpt2_and_split_one_by_one(char):
    gpt2 = build_gpt2_tokenizer()
    split = train_bpe_tokenizer(["the sum is 12345 and 678"] * 20, 300, split_digits=True)
    assert split.tokenize(" 12345")[1:] == ["1", "2", "3", "4", "5"]
    batch = collate([encode(char, "sum:", " 12345", 64) | {"row": {}}], char.pad_token_id)
    inside = {}
    for name, source in (("gpt2", gpt2), ("split", split)):
        out = Aligner(char, source)(batch["input_ids"], batch["attention_mask"], batch["targets"])
        inside[name] = (
            (out.inside_position[0] >= 0).nonzero().flatten().tolist(),
            out.inside_offset[0][out.inside_position[0] >= 0].tolist(),
        )
    # GPT-2 reads "sum", ":", " 123", "45": the positions predicting u and m are inside "sum"; those
    # predicting 1, 2, 3 are 1, 2, 3 bytes into " 123", the one predicting 5 is 1 byte into "45".
    # The digit-splitting source shares every boundary of the number.
    assert gpt2.tokenize("sum: 12345") == ["sum", ":", "Ġ123", "45"]
    assert inside["gpt2"] == ([1, 2, 5, 6, 7, 9], [1, 2, 1, 2, 3, 1])
    assert split.tokenize("sum: 12345") == ["su", "m", ":", "Ġ", "1", "2", "3", "4", "5"]
    assert inside["split"] == ([1], [1])  # only "u", inside "su"


def test_special_tokens_are_never_part_of_a_prefix_range(char):
    source = byte_bpe([("a", "b")])
    source.add_special_tokens({"additional_special_tokens": ["abz"]})  # a special whose text begins with "ab"
    assert source.tokenize("xab") == ["x", "ab"]
    got = student_distributions(char, source, {"ab": 0.3, "a": 0.1, "abz": 0.6}, "x", "ab")
    # Given "a": the special's mass counts neither above nor below; "a" itself ends at the boundary (tail).
    assert got[1] == pytest.approx({"b": 0.3 / 0.4})


def test_prefix_ranges_by_binary_search():
    pieces = [b"a", b"ab", b"abc", b"b", b"\xff", b"\xff\xff", None]
    prefixes = TokenPrefixes(pieces, [b"a", b"b", b"c", b"\xff"], rows=8)
    order = prefixes.sorted_bytes
    assert order == [b"a", b"ab", b"abc", b"b", b"\xff", b"\xff\xff"]
    assert prefixes.prefix_range(2, 1) == (0, 3)  # tokens beginning with "a"
    assert prefixes.prefix_range(2, 2) == (1, 3)  # with "ab"
    assert prefixes.prefix_range(5, 1) == (4, 6)  # with 0xff: up to the end of the order
    assert _successor(b"a\xff") == b"b" and _successor(b"\xff") is None
    assert (
        prefixes.sorted_ids.tolist()[:6] == [0, 1, 2, 3, 4, 5] and len(prefixes.sorted_ids) == 12
    )  # no special or padded row; read past the end
    assert prefixes.landing(torch.tensor([[2, 1]]), torch.tensor([1])).tolist() == [[1, 1]]  # "abc" and "ab" from byte 1: "b"


def test_a_student_token_spanning_source_tokens_gets_their_probability_along_the_text():
    # GPT-2 student, character source certain of nothing: 0.7 on "h", 0.2 on "e", 0.1 on "w" everywhere.
    # " hello" is one student token over six source characters; along the text the source spells
    # it with probability P(" ") P(h) P(e) P(l) P(l) P(o); that mass moves from the student token
    # its first character lands on to " hello".
    gpt2, char = build_gpt2_tokenizer(), build_char_tokenizer()
    probs = {" ": 0.5, "h": 0.2, "e": 0.1, "l": 0.1, "o": 0.05, "w": 0.05}
    got = student_distributions(gpt2, char, probs, "Say:", " hello")
    spelled = 0.5 * 0.2 * 0.1 * 0.1 * 0.1 * 0.05
    assert gpt2.tokenize(" hello") == ["Ġhello"]
    expected = {"Ġ": 0.5 - spelled, "Ġhello": spelled, "h": 0.2, "e": 0.1, "l": 0.1, "o": 0.05, "w": 0.05}
    assert got[0] == pytest.approx(expected, rel=1e-4)
    assert student_distributions(gpt2, char, probs, "Say:", " hello", union=True)[0] == pytest.approx(expected, rel=1e-4)
    # With `mask` (the policy's other half off), the source's characters alone.
    assert student_distributions(gpt2, char, probs, "Say:", " hello", "mask")[0] == pytest.approx(
        {"Ġ": 0.5, "h": 0.2, "e": 0.1, "l": 0.1, "o": 0.05, "w": 0.05}, rel=1e-4
    )
