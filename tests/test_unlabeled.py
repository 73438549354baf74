"""Prompts without gold answers: the data that declares them, the sources that answer them, the
cache that stores the answers, and the messages for bad input."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch
import yaml

from fusion.data.datamodule import FusionDataModule, collate, encode
from fusion.data.tokenizer import build_char_tokenizer
from fusion.objectives.selection import SourceSelector, fit_selector
from fusion.sources.cache import row_key
from fusion.stages.answers import write_answers
from fusion.stages.fusion import FusionDistillModule
from fusion.stages.fusion_settings import FusionSettings
from fusion.stages.routing import Router
from fusion.train import main
from tests.conftest import DOMAINS, tiny_config


def _module(zoo: str, **kwargs) -> FusionDistillModule:
    sources = [os.path.join(zoo, n) for n in ("spell", "sum", "noise")]
    settings = {"oracle": {"spell_backward": "spell", "chain_sum": "sum"}, "response_max_new_tokens": 8, **kwargs}
    module = FusionDistillModule(student=os.path.join(zoo, "student"), sources=sources, **settings)
    module.log_dict = lambda values, **kw: module.logged.update({k: float(v) for k, v in values.items()})
    module.log = lambda *a, **kw: None
    module.logged = {}
    return module


ROWS = [
    {"prompt": "backward abc=", "response": "cba", "domain": "spell_backward", "metadata": None},
    {"prompt": "backward dog=", "response": None, "domain": "spell_backward", "metadata": None},
    {"prompt": "3 + 4=", "response": None, "domain": "chain_sum", "metadata": None},
]


def _batch(module: FusionDistillModule, rows=ROWS) -> dict:
    return collate([encode(module.tokenizer, r["prompt"], r["response"], 32) | {"row": r} for r in rows], module.tokenizer.pad_token_id)


def _count_generations(module: FusionDistillModule) -> list[tuple[int, int]]:
    """(source, prompts) of every `generate` call of the pool's sources."""
    calls = []
    for index, model in enumerate(module.pool.models):
        original = model.generate

        def generate(*args, _index=index, _original=original, **kwargs):
            calls.append((_index, kwargs["input_ids"].shape[0]))
            return _original(*args, **kwargs)

        model.generate = generate
    return calls


# ------------------------------------------------------------------ data


def test_suite_unlabeled_prompts_carry_no_answer(tiny_zoo):
    student = os.path.join(tiny_zoo, "student")
    plain = FusionDataModule(tokenizer=student, domains=DOMAINS, train_size=10, val_size=4, test_size=4).load()
    data = FusionDataModule(tokenizer=student, domains=DOMAINS, train_size=10, val_size=4, test_size=4, unlabeled_size=7)
    rows = data.load()
    assert len(rows["unlabeled"]) == 14 and sorted({r["domain"] for r in rows["unlabeled"]}) == sorted(DOMAINS)
    for row in rows["unlabeled"]:  # nothing downstream can read the answer: no response, no metadata
        assert set(row) == {"prompt", "response", "domain", "metadata"} and row["response"] is None and row["metadata"] is None
    for split in ("train", "val", "test"):  # the labelled splits are exactly those of a corpus without unlabeled prompts
        assert rows[split] == plain[split]
    prompts = {split: {r["prompt"] for r in rows[split]} for split in ("train", "val", "test", "unlabeled")}
    assert not prompts["unlabeled"] & (prompts["train"] | prompts["val"] | prompts["test"])
    assert len(data.corpus()) == 34 and len(data.corpus(unlabeled=False)) == 20
    # A prompt-only row trains nothing until a source answers it.
    feature = encode(data.tokenizer, rows["unlabeled"][0]["prompt"], None, 64)
    assert set(feature["labels"]) == {-100} and feature["prompt_length"] == len(feature["input_ids"])


def test_train_loader_holds_unlabeled_prompts_only_for_a_method_that_answers_them(tiny_zoo):
    from types import SimpleNamespace

    data = FusionDataModule(tokenizer=os.path.join(tiny_zoo, "student"), domains=DOMAINS, train_size=4, unlabeled_size=6, batch_size=64)
    data.load()
    for learns, expected in ((True, 20), (False, 8)):
        data.trainer = SimpleNamespace(lightning_module=SimpleNamespace(learns_from_unlabeled=learns), world_size=1, global_rank=0)
        batch = next(iter(data.train_dataloader()))
        assert len(batch["rows"]) == expected and int(batch["labelled"].sum()) == 8


def test_files_declare_unlabeled_prompts(tiny_zoo, tmp_path):
    student = os.path.join(tiny_zoo, "student")
    rows = [{"prompt": f"backward w{i}=", "response": "" if i % 2 else f"{i}w"} for i in range(8)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for split in ("val", "test"):
        (tmp_path / f"{split}.jsonl").write_text(json.dumps({"prompt": "backward ab=", "response": "ba"}))
    # Without the setting, a missing answer is the error it always was, and it says what to set.
    strict = FusionDataModule(tokenizer=student, dataset=str(tmp_path), domain_column=None)
    with pytest.raises(
        ValueError,
        match=r"train.jsonl: row 1 has an empty 'response' \(data.response_column\), in the train split; "
        r"if the corpus has prompts without answers, set data.missing_response: unlabeled",
    ):
        strict.load()
    data = FusionDataModule(tokenizer=student, dataset=str(tmp_path), domain_column=None, missing_response="unlabeled")
    loaded = data.load()
    assert [r["prompt"] for r in loaded["unlabeled"]] == [f"backward w{i}=" for i in (1, 3, 5, 7)]
    assert len(loaded["train"]) == 4 and all(r["response"] for r in loaded["train"])
    # A prompt-only file: its answer column, if any, is dropped.
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": f"backward p{i}=", "answer": "secret"}) for i in range(3)))
    with_file = FusionDataModule(
        tokenizer=student,
        dataset=str(tmp_path),
        domain_column=None,
        missing_response="unlabeled",
        unlabeled_file=str(tmp_path / "prompts.jsonl"),
    ).load()
    assert len(with_file["unlabeled"]) == 7 and "secret" not in json.dumps(with_file["unlabeled"])
    # Test rows always need their answer.
    (tmp_path / "test.jsonl").write_text(json.dumps({"prompt": "backward ab=", "response": ""}))
    with pytest.raises(
        ValueError, match=r"test.jsonl: row 0 has an empty 'response' .* in the test split \(val and test rows need their answer\)"
    ):
        FusionDataModule(tokenizer=student, dataset=str(tmp_path), domain_column=None, missing_response="unlabeled").load()


# ------------------------------------------------------------------ who answers


class ScriptedPool:
    """A pool whose sources answer as scripted: source -> prompt -> (text, summed log-probability
    of the tokens written); records every `answer` call as (source, prompts)."""

    def __init__(self, script: dict[int, dict[str, tuple[str, float]]]):
        self.script, self.calls = script, []

    def answer(self, source, prompts, max_new_tokens, sampling=False, temperature=1.0):
        self.calls.append((source, list(prompts)))
        return [self.script[source][p][0] for p in prompts], torch.tensor([self.script[source][p][1] for p in prompts])


def _unlabeled(*prompts: str) -> list[dict]:
    return [{"prompt": p, "response": None, "domain": "spell_backward", "metadata": None} for p in prompts]


def _settings(fusion: str) -> FusionSettings:
    return FusionSettings(sources=["zoo/spell", "zoo/sum", "zoo/noise"], fusion=fusion, response_max_new_tokens=8)


def test_confidence_picks_the_highest_log_probability_per_student_token():
    """Char tokens, so an answer of n characters is n + 1 student tokens (eos included):
    p1: "ab" -3.0 / 3 = -1.0, "abcdef" -4.2 / 7 = -0.6, "" -0.1 / 1: the empty answer loses to
        any other however confident, and the longer answer wins with the lower total;
    p2: "xyz" -2.0 / 4 = -0.5 wins over "x" -1.4 / 2 = -0.7 (the highest total) and "xy" -1.8 / 3 = -0.6;
    p3: every answer empty (white space stripped): the most confident of them, source 1's -0.1."""
    script = {
        0: {"p1": (" ab ", -3.0), "p2": ("xyz", -2.0), "p3": ("", -0.2)},
        1: {"p1": ("abcdef", -4.2), "p2": ("x", -1.4), "p3": ("", -0.1)},
        2: {"p1": ("", -0.1), "p2": ("xy", -1.8), "p3": ("  ", -0.3)},
    }
    pool = ScriptedPool(script)
    answers = write_answers(_unlabeled("p1", "p2", "p3"), [[0, 1, 2]] * 3, pool, build_char_tokenizer(), _settings("confidence"))
    assert [(a["writer"], a["text"]) for a in answers] == [(1, "abcdef"), (0, "xyz"), (1, "")]
    assert all(a["generations"] == 3 and a["sources"] == [0, 1, 2] for a in answers)
    assert pool.calls == [(s, ["p1", "p2", "p3"]) for s in range(3)]  # each source answers every prompt, once


def test_uniform_writer_is_the_prompts_hash_modulo_the_sources():
    """The writer is sha256(prompt + "\\x00\\x01unlabelled")'s first 24 hex digits modulo N = 3:
    "backward dog=" 2dad0d559c0506e49fdc9821 -> 0, "backward cat=" 64552c69e8f00a900db7f531 -> 1,
    "backward ant=" 8989dfbe914989f78c5a3640 -> 2: one generation each, by that source alone, the
    same every time the prompt comes back."""
    prompts = ("backward dog=", "backward cat=", "backward ant=")
    assert [row_key(row) for row in _unlabeled(*prompts)] == [
        "2dad0d559c0506e49fdc9821",
        "64552c69e8f00a900db7f531",
        "8989dfbe914989f78c5a3640",
    ]
    script = {s: {p: (f"{p[-4:-1]} by {s}", -1.0) for p in prompts} for s in range(3)}
    for _ in range(2):
        pool = ScriptedPool(script)
        answers = write_answers(_unlabeled(*prompts), [[0, 1, 2]] * 3, pool, build_char_tokenizer(), _settings("uniform"))
        assert [(a["writer"], a["text"], a["generations"]) for a in answers] == [(0, "dog by 0", 1), (1, "cat by 1", 1), (2, "ant by 2", 1)]
        assert pool.calls == [(0, ["backward dog="]), (1, ["backward cat="]), (2, ["backward ant="])]


def test_the_selectors_top_source_writes_alone():
    """`first_selected`: the first of the sources that will run along the answer writes it."""
    prompts = ("p1", "p2", "p3")
    pool = ScriptedPool({s: {p: (f"{p} by {s}", -1.0) for p in prompts} for s in range(3)})
    answers = write_answers(_unlabeled(*prompts), [[2, 0], [1, 2], [2, 1]], pool, build_char_tokenizer(), _settings("selector"))
    assert [(a["writer"], a["text"], a["generations"], a["sources"]) for a in answers] == [
        (2, "p1 by 2", 1, [2, 0]),
        (1, "p2 by 1", 1, [1, 2]),
        (2, "p3 by 2", 1, [2, 1]),
    ]
    assert pool.calls == [(1, ["p2"]), (2, ["p1", "p3"])]


def test_a_selection_margin_weighs_the_sources_near_the_top():
    """With `selection_margin: 5`, of the top-3 only the sources whose predicted quality is within 5
    of the best selected one's are weighed: row 1 (-2, -4, -40 nats): the first two; row 2
    (-1, -9, -30): the top alone; the order of `selected` is kept. Without a margin, all three."""
    quality = torch.tensor([[-2.0, -40.0, -4.0, -90.0], [-9.0, -1.0, -30.0, -70.0]])
    selected = torch.tensor([[0, 2, 1], [1, 0, 2]])
    margin = Router(FusionSettings(sources=["zoo/a", "zoo/b", "zoo/c", "zoo/d"], top_k=3, selection_margin=5.0), None, None)
    assert margin.weighed(quality, selected).tolist() == [[True, True, False], [True, False, False]]
    assert Router(_settings("selector"), None, None).weighed(quality, selected).all()
    assert margin.weighed(None, selected).all()  # a rule-routed method weighs what its rule runs


def test_source_answer_and_its_log_probability(tiny_zoo):
    """`SourcePool.answer` decodes greedily in the source's own tokens and returns the log-probability
    of exactly the tokens it wrote (eos included), as a teacher-forced forward computes it."""
    module = _module(tiny_zoo, fusion="uniform")
    prompts = ["backward abc=", "12 + 3="]
    for index in (0, 1):  # the char specialist and the BPE one
        texts, logprob = module.pool.answer(index, prompts, max_new_tokens=8)
        tokenizer, model = module.pool.tokenizers[index], module.pool.models[index]
        for prompt, text, value in zip(prompts, texts, logprob.tolist()):
            feature = encode(tokenizer, prompt, None, 64)
            ids = torch.tensor([feature["input_ids"]])
            expected, written = 0.0, []
            for _ in range(8):  # greedy by hand
                logp = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)
                token = int(logp.argmax())
                expected += float(logp[token])
                if token == tokenizer.eos_token_id:
                    break
                written.append(token)
                ids = torch.cat([ids, torch.tensor([[token]])], 1)
            assert text == tokenizer.decode(written, skip_special_tokens=True)
            assert value == pytest.approx(expected, abs=1e-4)


def test_selector_top_source_writes_and_the_selected_run_along_it(tiny_zoo):
    module = _module(tiny_zoo, fusion="selector", top_k=2)
    with torch.no_grad():  # the selector prefers spell, then sum, on every prompt
        module.selector.net[-1].weight.zero_()
        module.selector.net[-1].bias.copy_(torch.tensor([-1.0, -2.0, -5.0]))
    calls = _count_generations(module)
    batch = module.answer_prompts(_batch(module))
    assert calls == [(0, 2)]  # one generation per unlabeled prompt, by the top source only
    assert batch["answer_sources"].tolist() == [[-1, -1], [0, 1], [0, 1]]
    texts, _ = module.pool.answer(0, ["backward dog=", "3 + 4="], 8)
    for b, text in ((1, texts[0]), (2, texts[1])):
        assert batch["answers"][b]["text"] == text.strip() and batch["answers"][b]["generations"] == 1
        # The answer, re-tokenized for the student, is what the student is trained on (eos included).
        trained = batch["targets"][b] != -100
        expected = module.tokenizer(text.strip(), add_special_tokens=False)["input_ids"] + [module.tokenizer.eos_token_id]
        assert batch["targets"][b][trained].tolist() == (expected if text.strip() else [])
    assert batch["answers"][0] is None and (batch["targets"][0] != -100).sum() == 4  # "cba" + eos, gold
    loss = module.training_step(_batch(module), 0)
    assert torch.isfinite(loss) and module.logged["train/answered"] == 2 and module.logged["train/generations"] == 2
    # The selected sources ran along the answers: select() keeps the writer's choice for those rows.
    quality = torch.tensor([[0.0, -1.0, -9.0]] * 3)
    module.eval()
    assert module.router.select(batch, quality).tolist() == [[0, 1], [0, 1], [0, 1]]


def test_confidence_keeps_the_most_confident_answer(tiny_zoo):
    module = _module(tiny_zoo, fusion="confidence")
    calls = _count_generations(module)
    batch = module.answer_prompts(_batch(module))
    assert sorted(calls) == [(0, 2), (1, 2), (2, 2)]  # N generations per unlabeled prompt
    assert batch["answer_sources"].tolist()[1:] == [[0, 1, 2]] * 2
    for b, prompt in ((1, "backward dog="), (2, "3 + 4=")):  # the writer's own answer (who wins: the scripted test above)
        writer = batch["answers"][b]["writer"]
        (text,), _ = module.pool.answer(writer, [prompt], 8)
        assert writer in (0, 1, 2) and batch["answers"][b]["text"] == text.strip() and batch["answers"][b]["generations"] == 3
    # Its weights are softmax(-CE) along the response (AvgCE where there is gold).
    ce = torch.tensor([[1.0, 2.0, 4.0]])
    assert torch.allclose(module.router.weights(None, ce, torch.ones_like(ce, dtype=torch.bool)), torch.softmax(-ce, -1))


def test_uniform_answer_comes_from_one_source_drawn_per_prompt(tiny_zoo):
    module = _module(tiny_zoo, fusion="uniform")
    calls = _count_generations(module)
    batch = module.answer_prompts(_batch(module))
    # Keys 2dad0d559c0506e49fdc9821 ("backward dog=") and 8c24a252492be2a6f45b544e ("3 + 4="): both 0 mod 3.
    assert [batch["answers"][b]["writer"] for b in (1, 2)] == [0, 0]
    assert calls == [(0, 2)]  # one generation per prompt, by spell
    texts, _ = module.pool.answer(0, ["backward dog=", "3 + 4="], 8)
    assert [batch["answers"][b]["text"] for b in (1, 2)] == [t.strip() for t in texts]
    assert batch["answer_sources"].tolist()[1:] == [[0, 1, 2]] * 2


def test_an_empty_answer_is_counted_and_trains_nothing(tiny_zoo):
    module = _module(tiny_zoo, fusion="oracle")
    model = module.pool.models[0]  # spell answers at once with its eos
    eos = module.pool.tokenizers[0].eos_token_id

    def eos_first(m, args, kwargs, out):
        logits = torch.full_like(out.logits, -30.0)
        logits[..., eos] = 0.0
        return out.__class__(logits=logits)

    model.register_forward_hook(eos_first, with_kwargs=True)
    loss = module.training_step(_batch(module), 0)
    assert torch.isfinite(loss)
    assert module.logged["train/empty_answers"] == 1 and module.logged["train/answered"] == 2
    batch = module.answer_prompts(_batch(module))
    assert batch["answers"][1]["text"] == "" and (batch["targets"][1] != -100).sum() == 0


def test_answers_are_not_quality_observations(tiny_zoo):
    """A source's CE along an answer (its own, or another's) never trains the selector, and the
    selection of the sources that run along an answer observes nothing, so nothing balances it:
    on a batch of unlabeled prompts the regression and feedback terms are zero and give the
    selector no gradient."""
    module = _module(tiny_zoo, fusion="selector", top_k=2, feedback_weight=1.0)
    loss = module.training_step(_batch(module, ROWS[1:]), 0)
    assert module.logged["train/loss_selector"] == 0.0 and module.logged["train/loss_feedback"] == 0.0
    loss.backward()
    assert all(p.grad is None or float(p.grad.abs().max()) == 0.0 for p in module.selector.parameters())


@pytest.mark.slow
def test_fit_selector_learns_the_best_source_per_prompt():
    """Prompts in three clusters (domains), each with its own best source: after the fit the
    selector ranks that source first on every row."""
    torch.manual_seed(0)
    best = torch.arange(90) % 3
    features = torch.randn(90, 8) + 5.0 * torch.nn.functional.one_hot(best, 8)
    ce = torch.full((90, 3), 6.0).scatter(1, best[:, None], 0.5)  # the best source 0.5 nats, the others 6
    observed = torch.ones(90, 3, dtype=torch.bool)
    observed[torch.arange(0, 90, 2), (best[::2] + 1) % 3] = False  # some pairs unobserved (never the best)
    selector = SourceSelector(8, 3, hidden_dim=32, initial_quality=-1.0)
    result = fit_selector(selector, features, ce, observed, max_steps=300, learning_rate=1e-2)
    assert result["top1_agreement"] == 1.0
    assert (selector(features).argmax(-1) == best).all()
    assert result["selector_loss"] < 0.5


@pytest.mark.slow
def test_fit_selector_stops_before_it_memorizes_noise():
    """CE unrelated to the prompt: the held-out rows stop the fit early (the mean, set before
    the first step, is the best prediction), where 500 steps would memorize the training rows."""
    torch.manual_seed(1)
    features, ce = torch.randn(100, 16), torch.rand(100, 4) * 6
    observed = torch.ones(100, 4, dtype=torch.bool)
    selector = SourceSelector(16, 4, hidden_dim=64)
    result = fit_selector(selector, features, ce, observed, max_steps=500, learning_rate=1e-2)
    assert result["steps"] <= 50
    memorized = SourceSelector(16, 4, hidden_dim=64)
    overfit = fit_selector(memorized, features, ce, observed, max_steps=500, learning_rate=1e-2, holdout=0.0)
    assert overfit["steps"] == 500 and overfit["selector_loss"] < 0.5 * result["selector_loss"]


# ------------------------------------------------------------------ through the CLI, cached


def test_fused_answers_are_decoded_by_the_weighed_sources_and_the_margin_weighs(tiny_zoo):
    """`answer_from: fused` with `selection_margin: 2`: the selector prefers spell (-1), then sum (-2),
    then noise (-5), so every prompt runs all three and weighs spell and sum. The answer is their
    equal-weight fused decoding (no source `generate`s), and in the step noise gets weight 0."""
    from fusion.sources.fused_decoding import fused_greedy

    module = _module(tiny_zoo, fusion="selector", top_k=3, answer_from="fused", selection_margin=2.0)
    with torch.no_grad():
        module.selector.net[-1].weight.zero_()
        module.selector.net[-1].bias.copy_(torch.tensor([-1.0, -2.0, -5.0]))
    calls = _count_generations(module)
    batch = module.answer_prompts(_batch(module))
    prompts = ["backward dog=", "3 + 4="]
    expected, _ = fused_greedy(
        module.pool.reading("marginal", "prefix"),
        prompts,
        torch.tensor([[0, 1, 2]] * 2),
        torch.tensor([[1.0, 1.0, 0.0]] * 2),
        module.tokenizer,
        8,
    )
    assert calls == [] and [batch["answers"][b]["text"] for b in (1, 2)] == [text.strip() for text in expected]
    assert [(batch["answers"][b]["writer"], batch["answers"][b]["generations"]) for b in (1, 2)] == [(-2, 2), (-2, 2)]
    assert batch["answer_sources"].tolist() == [[-1, -1, -1], [0, 1, 2], [0, 1, 2]]
    loss = module.training_step(_batch(module), 0)
    assert torch.isfinite(loss) and module.logged["train/weighed_sources"] == 2.0 and module.logged["weight/noise"] == 0.0
    assert module.logged["train/fused_renormalised"] == 0.0 and module.logged["train/generations"] == 4.0  # 2 prompts x 2 sources
    assert module.logged["weight/spell"] > 0 and module.logged["weight/sum"] > 0


@pytest.fixture(scope="module")
def unlabeled_cache(tiny_zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("unlabeled")
    config = tiny_config(
        tiny_zoo,
        str(root / "runs"),
        fusion="selector",
        top_k=1,
        source_mode="cached",
        cache_dir=str(root / "cache"),
        response_max_new_tokens=8,
        selector_prefit_steps=50,
    )
    config["data"]["unlabeled_size"] = 6
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["predict", "--config", str(path)])
    return {"config": str(path), "cache": str(root / "cache"), "root": root}


@pytest.mark.slow
def test_predict_answers_each_prompt_once_with_the_selector(unlabeled_cache):
    from fusion.sources.cache import answer_summary

    summary = answer_summary(unlabeled_cache["cache"])
    assert summary["prompts"] == 12 and summary["generations"] == 12 and summary["generations_per_prompt"] == 1.0
    assert sum(summary["writers"]) == 12 - summary["empty_answers"]


@pytest.mark.slow
def test_cached_fit_on_answered_prompts_runs_no_source(unlabeled_cache, monkeypatch):
    import fusion.sources.pool
    from fusion.sources.cache import answer_summary

    monkeypatch.setattr(fusion.sources.pool, "load_frozen", lambda *a, **k: (_ for _ in ()).throw(AssertionError("a source was loaded")))
    main(["fit", "--config", unlabeled_cache["config"], "--trainer.max_steps=3", "--data.batch_size=64"])
    (log,) = (unlabeled_cache["root"] / "runs" / "run").glob("version_*/metrics.csv")
    with open(log) as f:
        steps = [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f) if row.get("train/loss")]
    assert [int(s["step"]) for s in steps] == [0, 1, 2]
    # 32 labelled rows and 12 answered prompts, all 44 in every step: the 12 answers (the empty ones
    # too) come from the cache, no generation.
    empty = float(answer_summary(unlabeled_cache["cache"])["empty_answers"])
    for s in steps:
        assert (s["train/answered"], s["train/empty_answers"], s["train/generations"]) == (12.0, empty, 0.0), s
    assert all(sum(s[f"select/{n}"] for n in ("spell", "sum", "noise")) == pytest.approx(1.0) for s in steps)  # top_k 1


@pytest.mark.slow
def test_cache_answered_for_another_method_is_refused(unlabeled_cache):
    with pytest.raises(ValueError, match=r"computed for a different setup \(answers differ\): answers: cache has \{'fusion': 'selector'"):
        main(["fit", "--config", unlabeled_cache["config"], "--model.fusion=confidence", "--trainer.max_steps=1"])
    with pytest.raises(ValueError, match=r"\(answers differ\)"):
        main(["fit", "--config", unlabeled_cache["config"], "--model.response_max_new_tokens=4", "--trainer.max_steps=1"])


# ------------------------------------------------------------------ bad input


@pytest.mark.slow
def test_methods_that_need_gold_refuse_unlabeled_prompts(write_config):
    config = write_config(fusion="avgce")
    with pytest.raises(
        ValueError,
        match=r"model.fusion 'avgce' weighs sources by their CE on gold answers, and the fusion corpus "
        r"has 4 prompts without one .* use 'confidence'",
    ):
        main(["fit", "--config", config, "--data.unlabeled_size=2", "--trainer.max_steps=1"])


@pytest.mark.slow
def test_oracle_without_a_domain_column(tiny_zoo, tmp_path):
    rows = [{"prompt": f"backward w{i}=", "response": "" if i % 2 else f"{i}w"} for i in range(12)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for split in ("val", "test"):
        (tmp_path / f"{split}.jsonl").write_text(json.dumps({"prompt": "backward ab=", "response": "ba"}))
    config = tiny_config(tiny_zoo, str(tmp_path / "runs"), fusion="oracle")
    config["data"] = {"dataset": str(tmp_path), "domain_column": None, "missing_response": "unlabeled", "batch_size": 4}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(
        ValueError, match=r"model.fusion 'oracle' routes each row by its domain label, and the data have none \(data.domain_column"
    ):
        main(["fit", "--config", str(tmp_path / "config.yaml"), "--trainer.max_steps=1"])


def test_unlabeled_size_needs_the_suite(tmp_path):
    with pytest.raises(ValueError, match=r"data.unlabeled_size draws prompts from the embedded suite"):
        FusionDataModule(tokenizer="checkpoints/no-zoo/student", dataset=str(tmp_path / "x.jsonl"), unlabeled_size=3)


@pytest.mark.slow
def test_feedback_loss_biases_the_fitted_selector_towards_the_distractor(tiny_zoo):
    """`python -m fusion.bench selector`'s measurement on the tiny zoo: balancing the selection
    raises the predicted quality of the distractor (the random source, never the best) and lowers
    the specialists'; without it the fit is unbiased on average."""
    from fusion.bench.selector import measure_pool

    sources = [os.path.join(tiny_zoo, n) for n in ("spell", "sum", "noise")]
    bench = {
        "pools": {"A": sources[:2], "B": sources},
        "train": {
            "model": {"student": os.path.join(tiny_zoo, "student"), "oracle": {"spell_backward": "spell", "chain_sum": "sum"}},
            "data": {"domains": DOMAINS, "train_size": 16, "val_size": 2, "test_size": 2, "unlabeled_size": 8},
        },
    }
    result = measure_pool(bench, "B", [0.0, 1.0], seeds=[0])
    plain, balanced = result["feedback_weights"]["0.0"], result["feedback_weights"]["1.0"]
    assert result["labelled_rows"] == 32 and result["unlabeled_prompts"] == 16
    assert abs(plain["bias_specialists"]) < 0.05 and abs(plain["bias_distractors"]) < 0.05
    assert balanced["bias_distractors"] > plain["bias_distractors"] + 0.05, (plain, balanced)
    assert balanced["bias_specialists"] < plain["bias_specialists"] - 0.02, (plain, balanced)


def test_a_fitted_selector_stops_exploring(tiny_zoo):
    """Exploration (noise, balancing) is for a selector that has seen only what it selected: once
    it is fitted on the labelled rows, or reads the cache, it no longer explores."""
    from types import SimpleNamespace

    module = _module(tiny_zoo, fusion="selector", top_k=1, selector_prefit_steps=20)
    module.train()
    assert module.explores
    data = FusionDataModule(tokenizer=os.path.join(tiny_zoo, "student"), domains=DOMAINS, train_size=6, unlabeled_size=2)
    module.trainer = SimpleNamespace(datamodule=data)
    module.prefit_selector()
    assert not module.explores


def test_selector_features_do_not_move_while_the_adapter_trains(tiny_zoo):
    """The selector reads the frozen base: changing the adapter changes the student's outputs,
    not the prompt features (so the fitted selector stays valid), and the features of a prompt
    do not depend on its response."""
    module = _module(tiny_zoo, fusion="selector", top_k=1)
    batch = _batch(module, [dict(ROWS[0]), dict(ROWS[0], response="a longer one")])
    before, logits = module.router.features(batch), module(batch)
    with torch.no_grad():
        for name, parameter in module.student.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    assert torch.equal(module.router.features(batch), before)
    assert not torch.allclose(module(batch), logits)
    assert torch.allclose(before[0], before[1], atol=1e-6)
