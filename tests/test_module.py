"""The fusion module's wiring on the tiny zoo: which sources run, baseline weights, bad input."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

from fusion.data.datamodule import FusionDataModule, collate, encode
from fusion.stages.fusion import FusionDistillModule
from fusion.stages.student import stop_if_nonfinite
from fusion.train import main
from fusion.zoo import Architecture, build_model


def _module(zoo: str, **kwargs) -> FusionDistillModule:
    sources = [os.path.join(zoo, n) for n in ("spell", "sum", "noise")]
    settings = {"oracle": {"spell_backward": "spell", "chain_sum": "sum"}, **kwargs}
    return FusionDistillModule(student=os.path.join(zoo, "student"), sources=sources, **settings)


def _batch(module: FusionDistillModule) -> dict:
    rows = [
        {"prompt": "backward abc=", "response": "cba", "domain": "spell_backward"},
        {"prompt": "3 + 4=", "response": "7", "domain": "chain_sum"},
        {"prompt": "backward dog=", "response": "god", "domain": "spell_backward"},
    ]
    return collate([encode(module.tokenizer, r["prompt"], r["response"], 32) | {"row": r} for r in rows], module.tokenizer.pad_token_id)


def test_only_selected_sources_run(tiny_zoo):
    """Online, each source runs once, on exactly the sequences that selected it."""
    module = _module(tiny_zoo, top_k=1)
    batch = _batch(module)
    seen = []
    for index, model in enumerate(module.pool.models):
        model.register_forward_hook(lambda m, args, kwargs, out, i=index: seen.append((i, kwargs["input_ids"].shape[0])), with_kwargs=True)
    selected = torch.tensor([[0], [1], [0]])  # [B, k]
    out = module.pool.run(selected, batch)
    assert out.valid.all()
    assert sorted(seen) == [(0, 2), (1, 1)]  # the random source never ran; 3 sequence forwards in all
    # Sparse top-K over the student vocabulary, only on trained positions.
    assert out.ids.shape == (3, 1, batch["input_ids"].shape[1], 10)
    trained = batch["targets"] != -100
    assert torch.equal(out.aligned[:, 0], trained)
    assert (out.ids[:, 0][~trained] == -1).all()
    # They are the source's own top-10, with its log-probabilities, and its CE on the gold tokens.
    logits = module.pool.models[0](input_ids=batch["input_ids"][:1]).logits[0, :, :99]
    dense = torch.log_softmax(logits, -1)
    expected = dense.topk(10, -1)
    positions = trained[0]
    assert torch.equal(out.ids[0, 0][positions], expected.indices[positions])
    assert torch.allclose(out.logprobs[0, 0][positions], expected.values[positions], atol=1e-5)
    gold = dense.gather(-1, batch["targets"][0].clamp(min=0)[:, None])[:, 0][positions]
    assert torch.allclose(out.ce[0, 0], -gold.mean(), atol=1e-5)


def test_online_sources_report_their_probability_on_the_union_of_supports(tiny_zoo):
    """union=True: every selected source's log-probability at each id of the union of the
    selected sources' top-K; the fused target then holds more mass than with own supports."""
    from fusion.objectives.fusion_rule import fused_target

    module = _module(tiny_zoo, fusion="uniform")
    batch = _batch(module)
    selected = torch.tensor([[0, 1, 2]] * 3)
    own = module.pool.run(selected, batch)
    exact = module.pool.run(selected, batch, union=True)
    trained = batch["targets"] != -100
    dense = torch.log_softmax(module.pool.models[0](input_ids=batch["input_ids"]).logits[..., :99], -1)  # source 0: the student's tokenizer
    for b, t in trained.nonzero().tolist():
        speaking = exact.aligned[b, :, t].nonzero().squeeze(-1).tolist()
        union = {i for i in exact.ids[b, speaking[0], t].tolist() if i >= 0}
        assert all({i for i in exact.ids[b, slot, t].tolist() if i >= 0} == union for slot in speaking)  # one support for all
        assert len(union) <= 30 and set(own.ids[b, 0, t].tolist()) <= union  # source 0's own top-10 is in it
        ids = exact.ids[b, 0, t]
        assert torch.allclose(exact.logprobs[b, 0, t][ids >= 0], dense[b, t, ids[ids >= 0]], atol=1e-5)
    alpha = torch.full((3, 3), 1 / 3)
    mass_own = fused_target(own.ids, own.logprobs, alpha, own.aligned).probs.sum(-1)[trained]
    mass_union = fused_target(exact.ids, exact.logprobs, alpha, exact.aligned).probs.sum(-1)[trained]
    assert (mass_union >= mass_own - 1e-6).all() and (mass_union > mass_own + 1e-4).any()
    assert torch.equal(exact.ce, own.ce) and torch.equal(exact.aligned, own.aligned)


def test_baseline_selection_and_weights(tiny_zoo):
    batch = _batch(_module(tiny_zoo, fusion="none"))
    ce = torch.tensor([[1.0, 2.0, 4.0]] * 3)
    expectations = {"uniform": torch.full((3, 3), 1 / 3), "avgce": torch.softmax(-ce, -1), "mince": torch.tensor([[1.0, 0.0, 0.0]] * 3)}
    for fusion, alpha in expectations.items():
        module = _module(tiny_zoo, fusion=fusion)
        assert module.router.select(batch, None).tolist() == [[0, 1, 2]] * 3
        assert torch.allclose(module.router.weights(None, ce, torch.ones_like(ce, dtype=torch.bool)), alpha)
    assert _module(tiny_zoo, fusion="oracle").router.select(batch, None).tolist() == [[0], [1], [0]]
    assert _module(tiny_zoo, fusion="single", single_source="noise").router.select(batch, None).tolist() == [[2]] * 3
    selector = _module(tiny_zoo, fusion="selector", top_k=2, gamma=0.0, tau=1.0)
    quality = torch.tensor([[0.0, -1.0, -5.0], [-5.0, 0.0, -1.0], [0.0, -5.0, -1.0]])
    selector.eval()
    assert selector.router.select(batch, quality).tolist() == [[0, 1], [1, 2], [0, 2]]
    # gamma = 0: the weights are the selector's softmax over the selected.
    assert torch.allclose(
        selector.router.weights(torch.tensor([[0.0, -1.0]]), torch.tensor([[3.0, 0.1]]), torch.tensor([[True, True]])),
        torch.softmax(torch.tensor([[0.0, -1.0]]), -1),
    )


def test_training_step_logs_every_term(tiny_zoo):
    module = _module(tiny_zoo, fusion="selector", top_k=2)
    with torch.no_grad():  # the selector predicts u = log(0.5, 0.3, 0.2) for every prompt: pi = (0.5, 0.3, 0.2) at tau 1
        module.selector.net[-1].weight.zero_()
        module.selector.net[-1].bias.copy_(torch.tensor([0.5, 0.3, 0.2]).log())
    logged = {}
    module.log_dict = lambda values, **kw: logged.update({k: float(v) for k, v in values.items()})
    module.log = lambda *a, **kw: None
    loss = module.training_step(_batch(module), 0)
    assert module.explores  # online and not fitted yet: the feedback term counts, at weight 0.1
    # Feedback CV(I)^2 on the 3 labelled rows: importance I = 3 pi = (1.5, 0.9, 0.6), mean 1, population
    # variance (0.5^2 + 0.1^2 + 0.4^2) / 3 = 0.14.
    assert logged["train/loss_feedback"] == pytest.approx(0.14, rel=1e-5)
    # The total is the student's term plus the selector's regression and feedback terms.
    assert logged["train/loss"] == pytest.approx(float(loss))
    assert float(loss) == pytest.approx(
        logged["train/loss_student"] + logged["train/loss_selector"] + 0.1 * logged["train/loss_feedback"], rel=1e-6
    )
    assert logged["train/loss_selector"] > 0.0
    shares = [logged[f"select/{n}"] for n in ("spell", "sum", "noise")]
    assert sum(shares) == pytest.approx(2.0)  # two of three sources per sequence
    assert all(share * 3 == pytest.approx(round(share * 3)) for share in shares)  # a count of the 3 sequences
    normalized = torch.tensor(shares) / 2.0  # the selection entropy is that of the shares, normalized
    assert logged["train/selection_entropy"] == pytest.approx(float(-(normalized * normalized.clamp(min=1e-12).log()).sum()), abs=1e-6)
    assert sum(logged[f"weight/{n}"] for n in ("spell", "sum", "noise")) == pytest.approx(1.0)  # alpha sums to 1 per sequence
    assert logged["train/loss_student"] == pytest.approx(
        0.9 * logged["train/ce"] + 0.1 * logged["train/divergence"], rel=1e-6
    )  # lam 0.9, T 1


# ------------------------------------------------------------------ bad input, before any training


@pytest.mark.parametrize(
    "settings, error, message",
    [
        ({"top_k": 4}, ValueError, "model.top_k must be between 1 and the number of sources (3), got 4"),
        ({"top_k": 0}, ValueError, "model.top_k must be between 1"),
        ({"fusion": "moe"}, ValueError, "model.fusion must be one of"),
        ({"lam": 1.5}, ValueError, "model.lam must be in [0, 1], got 1.5"),
        ({"lam": -0.1}, ValueError, "model.lam must be in [0, 1], got -0.1"),
        ({"temperature": 0.0}, ValueError, "model.temperature and model.tau must be positive, got 0.0 and 1.0"),
        ({"temperature": -2.0}, ValueError, "model.temperature and model.tau must be positive, got -2.0 and 1.0"),
        ({"tau": 0.0}, ValueError, "model.temperature and model.tau must be positive, got 1.0 and 0.0"),
        ({"fusion": "single", "single_source": "nope"}, ValueError, "model.single_source must name one of the sources"),
    ],
)
def test_bad_settings_fail_early(settings, error, message):
    """Refused before any model loads: the paths (the zoo's names) need not exist."""
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        _module("checkpoints/no-zoo", **settings)


def test_missing_source_path(tiny_student, tmp_path):
    missing = str(tmp_path / "not-there")
    with pytest.raises(FileNotFoundError, match=r"model.sources\[1\]: .*not-there' does not exist"):
        FusionDistillModule(student=tiny_student, sources=[tiny_student, missing])


def test_directory_that_is_not_a_model(tiny_student, tmp_path):
    with pytest.raises(ValueError, match=r"model.sources\[0\]: .* is a directory but not a model"):
        FusionDistillModule(student=tiny_student, sources=[str(tmp_path)], top_k=1)


def test_pickled_weights_are_not_loaded(tiny_zoo, tmp_path):
    """A model directory with only pytorch_model.bin (a pickle) is refused: safetensors only."""
    import shutil

    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(os.path.join(tiny_zoo, "noise"), pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    os.remove(pickled / "model.safetensors")
    with pytest.raises(OSError, match=r"no file named model.safetensors found in directory .*pickled"):
        FusionDistillModule(student=os.path.join(tiny_zoo, "student"), sources=[str(pickled)], top_k=1).pool  # sources load where they run
    with pytest.raises(OSError, match=r"no file named model.safetensors"):
        FusionDistillModule(student=str(pickled), fusion="none")


def test_trust_remote_code_warns(tiny_student):
    with pytest.warns(UserWarning, match="model.trust_remote_code is true: the student's and sources' own Python code will run"):
        FusionDistillModule(student=tiny_student, fusion="none", trust_remote_code=True)


def test_source_with_another_vocabulary_is_aligned(tiny_zoo, tmp_path):
    """A source with its own 18-token tokenizer is aligned and mapped onto the student's 99 tokens."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<eos>", "<bos>", *"0123456789+-= "])}  # other ids
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    digits = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    model = build_model(Architecture(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, pad_vocab_to=8), digits, seed=0)
    model.save_pretrained(tmp_path / "digits")
    digits.save_pretrained(tmp_path / "digits")
    module = FusionDistillModule(
        student=os.path.join(tiny_zoo, "student"),
        sources=[os.path.join(tiny_zoo, "spell"), str(tmp_path / "digits")],
        fusion="uniform",
        vocab_map_dir=str(tmp_path / "maps"),
    )
    assert module.pool.aligners[0] is None and module.pool.aligners[1] is not None
    student = module.tokenizer
    vocab_map = module.pool.vocab_maps[1]
    assert vocab_map.shape == (24,)  # 18 tokens padded to 24 output rows; the padding maps nowhere
    assert vocab_map[digits.convert_tokens_to_ids("7")] == student.convert_tokens_to_ids("7")
    assert vocab_map[digits.eos_token_id] == student.eos_token_id and (vocab_map[18:] == -1).all()
    batch = _batch(module)
    out = module.pool.run(torch.tensor([[0, 1]] * 3), batch)
    trained = batch["targets"] != -100
    # Both are character-level on digits: the sum row ("7" and eos) is aligned at every trained position.
    assert torch.equal(out.aligned[1, 1], trained[1])
    # Its distributions live on the student's ids of digits, operators, space and the specials
    # (mapped by role: the source's pad, bos and eos to the student's); never on letters.
    allowed = {student.convert_tokens_to_ids(c) for c in "0123456789+-= "} | {
        student.eos_token_id,
        student.bos_token_id,
        student.pad_token_id,
        -1,
    }
    assert set(out.ids[:, 1].unique().tolist()) <= allowed
    assert module.pool.coverage["digits"] == 1.0  # the letters of the other rows are single <unk> tokens
    module.log_dict = lambda values, **kw: None
    module.log = lambda *a, **kw: None
    assert torch.isfinite(module.training_step(batch, 0))


def test_vocabulary_maps_go_to_the_per_user_cache_by_default(tiny_zoo, tmp_path, monkeypatch):
    """Without model.vocab_map_dir the maps of the two sources with other tokenizers (BPE-300 and
    GPT-2) are written under $FUSION_CACHE/vocab_maps, and nothing under the working directory."""
    monkeypatch.setenv("FUSION_CACHE", str(tmp_path / "cache"))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    module = _module(tiny_zoo, fusion="uniform")
    assert module.hparams.vocab_map_dir is None  # the checkpoint keeps no machine's path
    pool = module.pool
    maps = tmp_path / "cache" / "vocab_maps"
    written = sorted(os.listdir(maps))
    assert [name.split(".")[-1] for name in written] == ["json", "safetensors"] * 2
    summaries = [json.loads((maps / name).read_text()) for name in written if name.endswith(".json")]
    # One map per source with another tokenizer: BPE-300 (its own rows) and GPT-2 (50257 tokens in 50304 rows).
    assert sorted(s["source_rows"] for s in summaries) == sorted([pool.vocab_maps[1].shape[0], 50304])
    assert os.listdir(tmp_path / "work") == [] and os.listdir(tmp_path / "cache") == ["vocab_maps"]


def test_data_file_without_configured_column(tiny_zoo, tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) for i in range(20)))
    data = FusionDataModule(
        tokenizer=os.path.join(tiny_zoo, "student"),
        dataset=str(path),
        prompt_column="question",
        response_column="reply",
        domain_column=None,
    )
    with pytest.raises(
        ValueError, match=r"mine.jsonl: column 'reply' \(data.response_column\) is missing; the columns are \['question', 'answer'\]"
    ):
        data.setup("fit")


def test_data_file_with_empty_values(tiny_zoo, tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"q{i}", "response": "" if i == 3 else "a"}) for i in range(20)))
    data = FusionDataModule(tokenizer=os.path.join(tiny_zoo, "student"), dataset=str(path), domain_column=None)
    with pytest.raises(ValueError, match=r"mine.jsonl: row \d+ has an empty 'response' \(data.response_column\)"):
        data.setup("fit")


def test_local_file_with_own_columns_trains(tiny_zoo, tmp_path):
    """Any JSONL with configured column names loads into fixed, disjoint splits."""
    path = tmp_path / "mine.jsonl"
    path.write_text(
        "\n".join(
            json.dumps({"q": f"backward {w}=", "a": w[::-1]})
            for w in ["abc", "dog", "cat", "sun", "pen", "map", "cup", "hat", "box", "fan"]
        )
    )
    data = FusionDataModule(
        tokenizer=os.path.join(tiny_zoo, "student"), dataset=str(path), prompt_column="q", response_column="a", domain_column=None
    )
    rows = data.load()
    assert [len(rows[s]) for s in ("train", "val", "test")] == [8, 1, 1]
    assert not {r["prompt"] for r in rows["train"]} & {r["prompt"] for r in rows["test"]}
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and (batch["targets"] != -100).sum() == 8 * 4  # 3 letters + eos


@pytest.mark.slow
def test_bad_config_fails_before_training(write_config, tmp_path):
    """Through the CLI: an unknown fusion value stops before any checkpoint is written."""
    config = write_config(fusion="bogus")
    with pytest.raises(ValueError, match="model.fusion must be one of"):
        main(["fit", "--config", config])
    assert not os.path.exists(tmp_path / "runs" / "run")


# ------------------------------------------------------------------ numerical faults


def test_source_with_nonfinite_logits_is_skipped(tiny_zoo):
    """A source returning NaN/inf logits gets weight 0 and is not observed; the loss stays finite."""
    module = _module(tiny_zoo, fusion="avgce")
    module.pool.models[2].register_forward_hook(lambda m, args, out: out.__class__(logits=out.logits * float("nan")))
    logged = {}
    module.log_dict = lambda values, **kw: logged.update({k: float(v) for k, v in values.items()})
    module.log = lambda *a, **kw: None
    loss = module.training_step(_batch(module), 0)
    assert torch.isfinite(loss)
    assert logged["train/source_skipped"] == 3.0  # the faulty source, on each of the 3 sequences
    assert logged["weight/noise"] == 0.0
    assert logged["weight/spell"] + logged["weight/sum"] == pytest.approx(1.0)


def test_a_nonfinite_loss_on_another_process_stops_this_one(tiny_zoo, tmp_path):
    """Under DDP the processes agree (any non-finite loss) before backward; this one saves and stops too."""
    from types import SimpleNamespace

    module = _module(tiny_zoo, fusion="none")
    saved, decisions = [], []

    def any_process(decision, all):
        decisions.append((decision, all))
        return True  # another process's loss was not finite

    module._trainer = SimpleNamespace(
        strategy=SimpleNamespace(reduce_boolean_decision=any_process),
        log_dir=str(tmp_path),
        default_root_dir=str(tmp_path),
        global_step=7,
        save_checkpoint=saved.append,
    )
    with pytest.raises(FloatingPointError, match=r"the training loss of another process is not finite at step 7 .*nonfinite.ckpt"):
        stop_if_nonfinite(module, torch.tensor(2.5), {"loss": torch.tensor(2.5)})
    assert decisions == [(False, False)] and saved == [os.path.join(str(tmp_path), "checkpoints", "nonfinite.ckpt")]
    module._trainer.strategy.reduce_boolean_decision = lambda decision, all: decision  # one process, finite: go on
    stop_if_nonfinite(module, torch.tensor(2.5), {"loss": torch.tensor(2.5)})
    assert len(saved) == 1


def test_selector_does_not_learn_from_a_faulty_source(tiny_zoo):
    module = _module(tiny_zoo, fusion="selector", top_k=3, exploration_noise=0.0, feedback_weight=0.0)
    module.pool.models[0].register_forward_hook(lambda m, args, out: out.__class__(logits=out.logits + float("inf")))
    module.log_dict = lambda values, **kw: None
    module.log = lambda *a, **kw: None
    module.training_step(_batch(module), 0).backward()
    # The faulty source was not observed: its output unit gets no regression gradient at all.
    grads = module.selector.net[-1].bias.grad
    assert float(grads[0]) == 0.0 and abs(float(grads[1])) > 0.1 and abs(float(grads[2])) > 0.1


def test_nonfinite_logits_on_untrained_positions_are_harmless(tiny_zoo):
    """A source without `logits_to_keep` computes every position: inf on the prompt positions
    (never trained) keeps it usable, and it gives what the output layer run on the trained
    positions only gives."""
    module = _module(tiny_zoo, fusion="uniform")
    batch = _batch(module)
    selected = module.router.select(batch, None)
    kept = module.pool.run(selected, batch)
    source = module.pool.models[0]

    class EveryPosition(torch.nn.Module):  # a forward without logits_to_keep: the fallback path
        def __init__(self):
            super().__init__()
            self.inner, self.config = source, source.config

        def forward(self, input_ids, attention_mask):
            logits = self.inner(input_ids=input_ids, attention_mask=attention_mask).logits.clone()
            logits[:, 0, :] = float("inf")  # position 0 predicts a prompt token
            return SimpleNamespace(logits=logits)

    module.pool.models[0] = EveryPosition()
    out = module.pool.run(selected, batch)
    assert out.valid.all() and torch.isfinite(out.ce).all()
    assert torch.isfinite(out.logprobs[out.ids >= 0]).all()
    assert torch.equal(out.ids, kept.ids) and torch.allclose(out.logprobs, kept.logprobs, atol=1e-5)
    assert torch.allclose(out.ce, kept.ce, atol=1e-5)
    module.log_dict = lambda values, **kw: None
    module.log = lambda *a, **kw: None
    assert torch.isfinite(module.training_step(batch, 0))


@pytest.mark.parametrize("policy, kept", [("truncate", 10), ("drop", 9)])
def test_overlong_rows_are_truncated_or_dropped_and_counted(tiny_zoo, tmp_path, policy, kept):
    words = ["abc", "dog", "cat", "sun", "pen", "map", "cup", "hat", "box", "fan"]
    rows = [{"prompt": f"backward {w}=", "response": w[::-1]} for w in words]
    rows[0]["prompt"] = "x" * 100 + rows[0]["prompt"]  # longer than max_length
    for split, part in (("train", rows), ("val", rows[1:3]), ("test", rows[3:5])):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in part))
    data = FusionDataModule(
        tokenizer=os.path.join(tiny_zoo, "student"), dataset=str(tmp_path), domain_column=None, max_length=32, overlong=policy
    )
    features = data._features("train")
    assert data.overlong_counts["train"] == 1
    assert len(features) == kept
    assert all(len(f["input_ids"]) <= 32 for f in features)
    if policy == "truncate":  # the prompt lost its start, the response is whole
        assert data.tokenizer.decode(features[0]["input_ids"][-4:-1]) == "cba"


def test_unknown_overlong_policy(tiny_zoo):
    with pytest.raises(ValueError, match="data.overlong must be 'truncate' or 'drop', got 'cut'"):
        FusionDataModule(tokenizer=os.path.join(tiny_zoo, "student"), overlong="cut")


def test_empty_data_file(tiny_zoo, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    data = FusionDataModule(tokenizer=os.path.join(tiny_zoo, "student"), dataset=str(tmp_path / "empty.jsonl"))
    with pytest.raises(ValueError, match=r"empty.jsonl: the file is empty"):
        data.setup("fit")


def test_data_file_that_is_not_json(tiny_zoo, tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "resp\n')
    data = FusionDataModule(tokenizer=os.path.join(tiny_zoo, "student"), dataset=str(tmp_path / "broken.jsonl"))
    with pytest.raises(ValueError, match=r"broken.jsonl: could not be read as JSON lines"):
        data.setup("fit")


@pytest.mark.parametrize("rows", [1, 5])
def test_a_data_file_too_small_to_split_names_its_rows(tmp_path, rows):
    """One file is split 80/10/10; with fewer than 6 rows a split would be empty: the file, its
    row count and the minimum are named (datasets' own error named none of them)."""
    path = tmp_path / "tiny.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) for i in range(rows)))
    data = FusionDataModule(tokenizer="unused", dataset=str(path), domain_column=None)
    noun = "row" if rows == 1 else "rows"
    with pytest.raises(
        ValueError,
        match=rf"^data.dataset '{path}': {rows} {noun}; one file is split 80/10/10 into train, val and test, "
        r"which needs at least 6 rows \(then 4, 1 and 1\)",
    ):
        data.load()


def test_one_file_split_sizes_follow_datasets_rounding(tmp_path):
    """6 rows: 4 / 1 / 1 (20% of 6 rounds up to 2 held out, half of them test); 10: 8 / 1 / 1; 11: 8 / 1 / 2."""
    from fusion.data.datamodule import MIN_ONE_FILE_ROWS, one_file_split_sizes

    assert MIN_ONE_FILE_ROWS == 6 and one_file_split_sizes(5) == {"train": 4, "val": 0, "test": 1}
    for rows, sizes in ((6, [4, 1, 1]), (10, [8, 1, 1]), (11, [8, 1, 2])):
        path = tmp_path / f"{rows}.jsonl"
        path.write_text("\n".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) for i in range(rows)))
        loaded = FusionDataModule(tokenizer="unused", dataset=str(path), domain_column=None).load()
        assert [len(loaded[s]) for s in ("train", "val", "test")] == sizes == list(one_file_split_sizes(rows).values())


def test_missing_or_corrupt_model_paths_fail_at_once_naming_the_key(tmp_path, monkeypatch):
    """Never a wait on the hub's retries for a model that is missing locally."""
    import time

    from fusion.models import resolve_model_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "zoo").mkdir()
    started = time.time()
    with pytest.raises(FileNotFoundError, match=r"model.sources\[0\]: 'zoo/nosuch' does not exist"):
        resolve_model_path("zoo/nosuch", "model.sources[0]")  # looks like org/model, but zoo/ is a local folder
    assert resolve_model_path("org/model", "model.sources[0]") == "org/model"  # a hub name, looked up later
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"model.sources\[2\]: 'org/model' does not exist .*hub is switched off"):
        resolve_model_path("org/model", "model.sources[2]")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"model.sources\[1\]: 'broken/config.json' is not a readable JSON model config"):
        resolve_model_path("broken", "model.sources[1]")
    assert time.time() - started < 1.0


def test_a_hub_name_that_cannot_load_names_its_key(tmp_path, monkeypatch):
    """A hub-looking source the hub cannot serve fails naming model.sources[i], the path and the
    library's first line, not a bare OSError from deep in transformers."""
    from fusion.sources import pool

    def unreachable(path, trust_remote_code):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your internet connection")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pool, "load_tokenizer", unreachable)
    with pytest.raises(OSError) as error:
        pool.SourcePool.load(["org/model"], student_tokenizer=None)
    assert str(error.value) == (
        "model.sources[0]: could not load 'org/model' (a model directory or a hub name like org/model): "
        "We couldn't connect to 'https://huggingface.co' to load the files."
    )


def test_likelihood_selector_reads_the_sequence_nll(tiny_zoo):
    """With selector_loss likelihood the selector's observation is CE times the response's trained tokens."""
    student, sources = os.path.join(tiny_zoo, "student"), [os.path.join(tiny_zoo, n) for n in ("spell", "sum")]
    module = FusionDistillModule(student=student, sources=sources, top_k=1, selector_loss="likelihood")
    batch = {"targets": torch.tensor([[-100, 5, 6, 7], [-100, -100, 5, -100]])}
    ce = torch.tensor([[0.5, 1.0], [2.0, 0.1]])
    assert torch.allclose(module.router.observation(ce, batch["targets"]), torch.tensor([[1.5, 3.0], [2.0, 0.1]]))
    assert FusionDistillModule(student=student, sources=sources, top_k=1).router.observation(ce, batch["targets"]) is ce
    with pytest.raises(ValueError, match="selector_loss 'likelihood' reads a probability"):
        FusionDistillModule(student=student, sources=sources, top_k=1, selector_loss="likelihood", selector_signal="rewards")
