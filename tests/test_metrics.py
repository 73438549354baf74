"""Evaluation metrics on hand-made numbers: perplexity over the response tokens only, and accuracy
per domain with its mean over domains."""

from __future__ import annotations

import math

import pytest
import torch

from fusion.data import IGNORE_INDEX
from fusion.stages.metrics import EvalMetrics


def test_perplexity_and_accuracy_by_hand():
    metrics = EvalMetrics(["a", "b"], [])
    probs = torch.tensor(
        [[[0.5, 0.25, 0.25], [0.1, 0.2, 0.7], [0.9, 0.05, 0.05]], [[0.2, 0.2, 0.6], [1 / 3, 1 / 3, 1 / 3], [0.3, 0.3, 0.4]]]
    )
    targets = torch.tensor([[0, 2, IGNORE_INDEX], [IGNORE_INDEX, 1, IGNORE_INDEX]])  # ignored: a prompt or padding
    metrics.update(probs.log() + 5.0, targets, ["a", "b"], [True, False])  # logits up to a constant
    metrics.update(probs[:1].log(), targets[:1], ["a"], [False])
    result = metrics.compute()
    nll = [-math.log(0.5), -math.log(0.7), -math.log(1 / 3), -math.log(0.5), -math.log(0.7)]
    assert result["perplexity"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
    assert result["acc"] == {"a": 0.5, "b": 0.0} and result["acc_mean"] == 0.25
    assert result["sequences"] == {"a": 2, "b": 1}
    metrics.reset()
    metrics.update(probs[1:].log(), targets[1:], ["b"], [True])
    assert metrics.compute()["perplexity"] == pytest.approx(3.0, rel=1e-5)  # one token at 1/3


def test_a_single_domain_is_reported_as_one():
    """torchmetrics squeezes a one-element result to 0-d; one domain (or data.domain_column: null) must still report."""
    metrics = EvalMetrics(["default"], ["a", "b"])
    logits = torch.zeros(2, 3, 5)
    targets = torch.tensor([[1, 2, IGNORE_INDEX], [3, IGNORE_INDEX, IGNORE_INDEX]])
    metrics.update(logits, targets, ["default", "default"], [True, False], torch.tensor([[0], [1]]))
    result = metrics.compute()
    assert result["acc"] == {"default": 0.5} and result["sequences"] == {"default": 2}
    assert result["selection_by_domain"] == {"default": {"a": 0.5, "b": 0.5}}
    assert result["perplexity"] == pytest.approx(5.0)


@pytest.mark.slow
def test_single_domain_data_trains_validates_and_tests(tiny_zoo, tmp_path):
    import json

    from fusion.train import main

    from .conftest import tiny_config

    config = tiny_config(tiny_zoo, str(tmp_path), fusion="oracle")
    config["data"]["domains"] = ["spell_backward"]
    config["trainer"]["num_sanity_val_steps"] = 2
    run = main(["--config", json.dumps(config)], run=False)
    run.trainer.fit(run.model, datamodule=run.datamodule)
    run.trainer.test(run.model, datamodule=run.datamodule, verbose=False)
    assert set(run.model.test_results["acc"]) == {"spell_backward"} and run.model.test_results["sequences"] == {"spell_backward": 4}
