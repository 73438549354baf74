"""The stages' settings objects: one field per constructor argument (users' configs and checkpoints
name them), and the cache's keys: exactly the settings its numbers and answers depend on."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from fusion.stages.fusion import FusionDistillModule
from fusion.stages.fusion_settings import ANSWER_SETTINGS, SOURCE_OUTPUT_SETTINGS, FusionSettings
from fusion.stages.srft import SRFTModule, SRFTSettings


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@pytest.mark.parametrize("module, settings", [(FusionDistillModule, FusionSettings), (SRFTModule, SRFTSettings)])
def test_settings_mirror_the_constructor(module, settings):
    """Names, defaults and order: `model.*` keys of a config, and the hparams of a checkpoint, build both."""
    parameters = list(inspect.signature(module.__init__).parameters.values())[1:]
    fields = dataclasses.fields(settings)
    assert [p.name for p in parameters] == [f.name for f in fields]
    assert [p.default for p in parameters] == [_default(f) for f in fields]
    assert [p.annotation for p in parameters] == [f.type for f in fields]


SOURCES = ["zoo/a", "zoo/b", "zoo/c"]
ALTERNATIVES = {  # a second valid value of each setting
    "student": "zoo/other",
    "sources": ["zoo/a", "zoo/b", "zoo/c", "zoo/d"],
    "top_k": 1,
    "selection_margin": 5.0,
    "single_source": "b",
    "oracle": {"d1": "b"},
    "lam": 0.5,
    "temperature": 2.0,
    "source_top_k": 5,
    "unaligned": "mask",
    "vocab_map": "exact",
    "vocab_map_dir": "maps",
    "boundary": "prefix",
    "gamma": 0.5,
    "tau": 2.0,
    "feedback_weight": 0.5,
    "selector_loss": "huber",
    "selector_hidden": 8,
    "initial_quality": 0.0,
    "selector_prefit_steps": 3,
    "exploration_noise": 0.5,
    "exploration_steps": 3,
    "lora": {"r": 4},
    "learning_rate": 0.1,
    "selector_learning_rate": 0.1,
    "weight_decay": 0.1,
    "warmup_steps": 1,
    "lr_decay_fraction": 0.5,
    "lora_b_lr_ratio": 4.0,
    "max_new_tokens": 3,
    "response_max_new_tokens": 3,
    "response_sampling": True,
    "response_temperature": 0.5,
    "response_from": "student",
    "answer_from": "fused",
    "sample_temperature": 0.5,
    "sample_max_new_tokens": 3,
    "on_policy_fraction": 0.5,
    "on_policy_mix": "joint",
    "divergence": "jsd",
    "jsd_beta": 0.3,
    "selector_signal": "rewards",
    "selector_rewards": {"x.y": 1.0},
    "curriculum_floor": 0.5,
    "curriculum_momentum": 0.5,
    "init_from": "a.ckpt",
    "dtype": "bfloat16",
    "trust_remote_code": True,
    "source_mode": "cached",
    "cache_dir": "cache",
}
BASES = [  # every method, answers sampled or not
    {"fusion": fusion, "sources": SOURCES, "single_source": "a", "oracle": {"d1": "a"}, "response_sampling": sampling, "top_k": 2}
    for fusion in ("none", "uniform", "avgce", "mince", "confidence", "single", "oracle", "selector")
    for sampling in (False, True)
] + [{"fusion": "selector", "sources": SOURCES, "top_k": 2, "answer_from": "fused"}]


def test_cache_keys_are_the_settings_the_cache_depends_on():
    """A setting changes what the cache holds (`source_output_settings`, `answer_settings`) somewhere
    exactly when it is one of the keys `fusion.bench.quality` names its caches by."""
    assert set(ALTERNATIVES) == set(FusionSettings.names()) - {"fusion"}
    changes = {"source": set(), "answer": set()}
    for base in BASES:
        settings = FusionSettings(**base)
        for name, value in ALTERNATIVES.items():
            try:
                other = dataclasses.replace(settings, **{name: value})
            except ValueError:  # a combination the settings refuse
                continue
            if other.source_output_settings() != settings.source_output_settings():
                changes["source"].add(name)
            if other.answer_settings() != settings.answer_settings():
                changes["answer"].add(name)
        for fusion in ("uniform", "oracle", "selector"):
            try:
                if dataclasses.replace(settings, fusion=fusion).answer_settings() != settings.answer_settings():
                    changes["answer"].add("fusion")
            except ValueError:
                continue
    # The boundary follows response_from, but a run along the student's samples never reads a cache.
    assert changes["source"] - {"response_from"} == set(SOURCE_OUTPUT_SETTINGS)
    assert changes["answer"] == set(ANSWER_SETTINGS)


def test_what_the_settings_imply():
    selector = FusionSettings(sources=SOURCES, top_k=2)
    assert selector.source_names == ["a", "b", "c"] and selector.source_forwards == 2 and not selector.pool_independent
    assert FusionSettings(sources=SOURCES, fusion="uniform").source_forwards == 3
    assert FusionSettings(sources=SOURCES, fusion="oracle", oracle={"d": "a"}).pool_independent
    assert FusionSettings(fusion="none").source_forwards == 0
    assert FusionSettings(sources=SOURCES, selector_signal="rewards").online_only
    assert FusionSettings(sources=SOURCES, response_from="student").resolved_boundary == "prefix"
    assert FusionSettings(sources=SOURCES).resolved_boundary == "token_end"
    with pytest.raises(dataclasses.FrozenInstanceError):
        selector.top_k = 1


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"fusion": "uniform", "answer_from": "fused"}, "model.answer_from acts on the selector's top-k: it needs model.fusion 'selector'"),
        ({"fusion": "oracle", "oracle": {"d": "a"}, "selection_margin": 2.0}, "model.selection_margin acts on the selector's top-k"),
        ({"selection_margin": -1.0}, r"model.selection_margin must be at least 0 \(or null"),
        ({"answer_from": "vote"}, r"model.answer_from must be one of \('top', 'fused'\), got 'vote'"),
    ],
)
def test_answer_settings_are_refused_by_key(settings, message):
    with pytest.raises(ValueError, match=message):
        FusionSettings(**{"sources": SOURCES, **settings})
