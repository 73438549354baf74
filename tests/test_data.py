"""Tokenizing data sets: `Dataset.map` over files gives `encode`'s ids, row for row, and datasets
keeps the result in its cache. Tokenizers are built here (nothing downloaded)."""

from __future__ import annotations

import json
import os
import random

import pytest

from fusion.data.datamodule import FEATURES, FusionDataModule, _read_file, encode, encode_batch, encode_table
from fusion.data.tokenizer import build_char_tokenizer, build_gpt2_tokenizer


def _write_rows(directory, seed: int = 0) -> None:
    """train (300 rows, every 7th without a response), val and test (20 each), prompts of 1-60
    random characters: many longer than max_length."""
    rng = random.Random(seed)
    os.makedirs(directory, exist_ok=True)
    for split, count in (("train", 300), ("val", 20), ("test", 20)):
        rows = []
        for i in range(count):
            word = "".join(rng.choice("abcdefgh 123") for _ in range(rng.randint(1, 60)))
            response = "" if split == "train" and i % 7 == 0 else word[::-1]
            rows.append({"prompt": f"backward {word}=", "response": response, "domain": "d" + str(i % 3)})
        (directory / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))


def _module(directory, tokenizer, **settings) -> FusionDataModule:
    settings = {"missing_response": "unlabeled", "max_length": 32} | settings
    data = FusionDataModule(tokenizer="built-in-test", dataset=str(directory), **settings)
    data._tokenizer = tokenizer
    return data


def _per_row(tokenizer, features: list[dict], max_length: int = 32) -> list[dict]:
    return [encode(tokenizer, f["row"]["prompt"], f["row"]["response"], max_length) for f in features]


@pytest.mark.parametrize("build", [build_char_tokenizer, build_gpt2_tokenizer], ids=["char", "gpt2"])
def test_map_over_files_gives_the_per_row_encoding(tmp_path, build):
    tokenizer = build()
    _write_rows(tmp_path / "data")
    (tmp_path / "prompts.jsonl").write_text(
        "\n".join(json.dumps({"prompt": f"backward p{i}=" + "x" * i, "answer": "secret"}) for i in range(40))
    )
    data = _module(tmp_path / "data", tokenizer, unlabeled_file=str(tmp_path / "prompts.jsonl"))
    rows = data.load()
    assert (len(rows["train"]), len(rows["unlabeled"])) == (300 - 43, 43 + 40)
    corpus = data._features("train", ("train", "unlabeled"))
    assert len(corpus) == 340 and [f["row"] for f in corpus] == data.corpus()
    assert [{k: f[k] for k in FEATURES} for f in corpus] == _per_row(tokenizer, corpus)
    # Truncated rows and rows without a response are among them.
    assert data.overlong_counts["train"] > 50 and sum(f["truncated"] for f in corpus) == data.overlong_counts["train"]
    unlabeled = [f for f in corpus if f["row"]["response"] is None]
    assert len(unlabeled) == 83 and all(set(f["labels"]) == {-100} for f in unlabeled)
    assert any(len(f["input_ids"]) == 32 for f in unlabeled)  # a long prompt without answer, cut to max_length
    for split in ("val", "test"):
        features = data._features(split)
        assert len(features) == 20 and [{k: f[k] for k in FEATURES} for f in features] == _per_row(tokenizer, features)


def test_one_file_and_the_suite_encode_as_per_row(tmp_path):
    tokenizer = build_char_tokenizer()
    _write_rows(tmp_path / "data")
    lines = (tmp_path / "data" / "val.jsonl").read_text().splitlines() * 5  # 100 labelled rows, split 80/10/10
    (tmp_path / "one.jsonl").write_text("\n".join(lines))
    data = _module(tmp_path / "one.jsonl", tokenizer)
    for split in ("train", "val", "test"):
        features = data._features(split)
        assert len(features) == {"train": 80, "val": 10, "test": 10}[split]
        assert [{k: f[k] for k in FEATURES} for f in features] == _per_row(tokenizer, features)
    suite = FusionDataModule(tokenizer="built-in-test", domains=["spell_backward", "chain_sum"], train_size=100, max_length=24)
    suite._tokenizer = tokenizer
    features = suite._features("train")
    assert len(features) == 200 and [{k: f[k] for k in FEATURES} for f in features] == _per_row(tokenizer, features, 24)


def test_encode_batch_by_hand():
    """Char tokenizer, max_length 5; labels only on the response and eos; a long prompt loses its
    start; a row without a response trains nothing."""
    tokenizer = build_char_tokenizer()
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    a, b, c = tokenizer.convert_tokens_to_ids(["a", "b", "c"])
    columns = encode_batch(tokenizer, ["ab", "abcabc", "cab"], ["c", "ba", None], 5)
    assert columns == {
        "input_ids": [[bos, a, b, c, eos], [b, c, b, a, eos], [bos, c, a, b]],
        "labels": [[-100, -100, -100, c, eos], [-100, -100, b, a, eos], [-100] * 4],
        "prompt_length": [3, 2, 4],
        "truncated": [False, True, False],
    }
    assert encode_batch(tokenizer, [], [], 5) == {k: [] for k in FEATURES}


def test_the_map_is_cached_by_datasets(tmp_path):
    """The same file, tokenizer and settings: the second map reads the first one's cache file."""
    tokenizer = build_char_tokenizer()
    _write_rows(tmp_path / "data")
    first = encode_table(_read_file(str(tmp_path / "data" / "train.jsonl")), tokenizer, "prompt", "response", 32)
    [cache] = [f["filename"] for f in first.cache_files if os.path.basename(f["filename"]).startswith("cache-")]
    written = os.path.getmtime(cache)
    again = encode_table(_read_file(str(tmp_path / "data" / "train.jsonl")), build_char_tokenizer(), "prompt", "response", 32)
    assert [f["filename"] for f in again.cache_files] == [cache] and os.path.getmtime(cache) == written
    other = encode_table(_read_file(str(tmp_path / "data" / "train.jsonl")), tokenizer, "prompt", "response", 16)
    assert [f["filename"] for f in other.cache_files] != [cache]  # another max_length: another cache


# ------------------------------------------------------------------ chat templates

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _chat_tokenizer(template: str = TEMPLATE):
    """The char tokenizer with a special end-of-turn token <|end|> and a hand-written template."""
    tokenizer = build_char_tokenizer()
    tokenizer.add_tokens(["<|end|>"], special_tokens=True)
    tokenizer.chat_template = template
    return tokenizer


def test_chat_template_renders_prompts_and_ends_responses_with_the_end_of_turn(tmp_path):
    tokenizer = _chat_tokenizer()
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert end == 99 != tokenizer.eos_token_id
    _write_rows(tmp_path / "data")
    for split in ("train", "val", "test"):  # every row labelled
        path = tmp_path / "data" / f"{split}.jsonl"
        path.write_text(
            "\n".join(json.dumps(r | {"response": r["response"] or "x"}) for r in map(json.loads, path.read_text().splitlines()))
        )
    with pytest.warns(
        UserWarning,
        match=r"data.chat_template: responses end with the template's end of turn '<\|end\|>', but generation stops at eos '<eos>'",
    ):
        data = _module(tmp_path / "data", tokenizer, chat_template=True, max_length=200)
        data.setup("fit")
    assert data.chat.end_id == end
    assert data.chat.render("backward ab=") == "<|user|>backward ab=<|end|><|assistant|>"
    features = data._features("train")
    assert len(features) == 300 and data.overlong_counts["train"] == 0
    for f in features:
        row = f["row"]
        prompt = tokenizer(data.chat.render(row["prompt"]), add_special_tokens=False)["input_ids"]
        response = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [end]
        assert f["input_ids"] == prompt + response  # no bos added: the template decides
        assert f["labels"] == [-100] * len(prompt) + response and f["prompt_length"] == len(prompt)
        assert tokenizer.decode(prompt) == f"<|user|>{row['prompt']}<|end|><|assistant|>"
    assert [{k: f[k] for k in FEATURES} for f in features] == [
        encode(tokenizer, f["row"]["prompt"], f["row"]["response"], 200, data.chat) for f in features
    ]
    # The suite's rows (encode_batch) render the same way.
    suite = FusionDataModule(tokenizer="built-in-test", domains=["chain_sum"], train_size=20, max_length=96, chat_template=True)
    suite._tokenizer = tokenizer
    first = suite._features("train")[0]
    assert (
        first["input_ids"]
        == tokenizer(suite.chat.render(first["row"]["prompt"]) + first["row"]["response"] + "<|end|>", add_special_tokens=False)[
            "input_ids"
        ]
    )


def test_chat_template_end_of_turn_is_eos_when_the_template_writes_eos(tmp_path, recwarn):
    tokenizer = _chat_tokenizer(TEMPLATE.replace("<|end|>", "<eos>"))
    data = FusionDataModule(tokenizer="built-in-test", domains=["chain_sum"], train_size=4, chat_template=True)
    data._tokenizer = tokenizer
    feature = data._features("train")[0]
    assert data.chat.end_id == tokenizer.eos_token_id and feature["input_ids"][-1] == tokenizer.eos_token_id
    assert feature["labels"][-1] == tokenizer.eos_token_id
    assert not [w for w in recwarn if "chat_template" in str(w.message)]


def test_chat_template_needs_a_template_and_labelled_rows(tmp_path):
    data = FusionDataModule(tokenizer="built-in-test", domains=["chain_sum"], train_size=4, chat_template=True)
    data._tokenizer = build_char_tokenizer()
    with pytest.raises(ValueError, match=r"data.chat_template: the tokenizer .* has no chat template .* set data.chat_template: false"):
        data.setup("fit")
    data = FusionDataModule(tokenizer="built-in-test", domains=["chain_sum"], train_size=4, unlabeled_size=2, chat_template=True)
    data._tokenizer = _chat_tokenizer()
    with pytest.raises(ValueError, match=r"data.chat_template applies to labelled rows only"):
        data.setup("fit")
