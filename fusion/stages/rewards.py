"""Reward functions for the SRFT stage: plain callables named by dotted path in YAML.

A reward function takes the prompts, the completions and the data set's other columns (one list
per column, aligned with the completions) and returns one number per completion:

    def my_reward(prompts: list[str], completions: list[str], **columns) -> list[float]

In the config, several functions with weights; the reward of a completion is the weighted sum:

    model:
      init_args:
        rewards:
          fusion.stages.rewards.task_score: 1.0
          my_package.rewards.brevity: 0.1

The columns of the embedded suite are `response` (the gold answer), `domain` and `metadata`; on a
prompt without gold (see `fusion.data.datamodule`) `response` and `metadata` are None.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Any

import torch

from fusion.data import tasks

RewardFunction = Callable[..., list[float]]


def task_score(
    prompts: list[str], completions: list[str], domain: list[str], response: list[str], metadata: list | None = None, **columns
) -> list[float]:
    """The task's own reasoning-gym scorer in [0, 1] (exact match outside the embedded suite)."""
    metadata = metadata if metadata is not None else [None] * len(completions)
    return [
        tasks.score(d, completion, {"prompt": prompt, "response": gold, "metadata": meta})
        for prompt, completion, d, gold, meta in zip(prompts, completions, domain, response, metadata)
    ]


def task_correct(
    prompts: list[str], completions: list[str], domain: list[str], response: list[str], metadata: list | None = None, **columns
) -> list[float]:
    """1 where the task's scorer gives full marks, else 0: the verifier's {0, 1} reward, and the
    evaluation's notion of a correct answer (the scorers' partial credit rewards near misses such
    as an answer with trailing junk)."""
    return [float(score >= 1.0) for score in task_score(prompts, completions, domain, response, metadata)]


def exact_match(prompts: list[str], completions: list[str], response: list[str], **columns) -> list[float]:
    """1 where the completion equals the gold response (surrounding whitespace ignored), else 0."""
    return [float(completion.strip() == gold.strip()) for completion, gold in zip(completions, response)]


def answer_format(prompts: list[str], completions: list[str], domain: list[str], **columns) -> list[float]:
    """1 where the completion has the form its prompt asks for (`tasks.well_formed`), else 0.

    Label-free: it reads the prompt, the completion and the domain, never `response` or
    `metadata`, so it scores an answer to a prompt without gold as it scores any other (the
    selector's default reward, `model.selector_rewards`).
    """
    return [float(tasks.well_formed(d, prompt, completion)) for prompt, completion, d in zip(prompts, completions, domain)]


def resolve(path: str, key: str) -> RewardFunction:
    """The callable at dotted `path` ("package.module.function"), or an error naming `key`."""
    module_name, _, attribute = path.rpartition(".")
    if not module_name:
        raise ValueError(f"{key}: {path!r} is not a dotted path like 'fusion.stages.rewards.task_score'")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"{key}: cannot import reward function {path!r}: {error}") from error
    if not callable(function):
        raise ValueError(f"{key}: {path!r} is not callable")
    return function


class Rewards:
    """Weighted reward functions; calling them checks every answer.

    A function that raises, returns a different number of values than completions, or a value
    that is not a finite number stops training with an error that names the function.
    """

    def __init__(self, spec: dict[str, float], key: str = "model.rewards"):
        if not spec:
            raise ValueError(f"{key} is empty; name at least one reward function, e.g. {{'fusion.stages.rewards.task_score': 1.0}}")
        self.functions: dict[str, tuple[RewardFunction, float]] = {}
        for path, weight in spec.items():
            if not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"{key}[{path!r}]: the weight must be a finite number, got {weight!r}")
            self.functions[path] = (resolve(path, f"{key}[{path!r}]"), float(weight))

    def __call__(self, prompts: list[str], completions: list[str], columns: dict[str, list[Any]]) -> tuple[torch.Tensor, dict[str, float]]:
        """The weighted reward of each completion [n] and each function's mean (for logging)."""
        n = len(completions)
        total = torch.zeros(n)
        means = {}
        for path, (function, weight) in self.functions.items():
            try:
                values = function(prompts, completions, **columns)
            except Exception as error:
                raise RuntimeError(f"reward function {path!r} raised {type(error).__name__}: {error}") from error
            try:
                values = [float(v) for v in values]
            except (TypeError, ValueError) as error:
                raise ValueError(f"reward function {path!r} must return a list of numbers: {error}") from error
            if len(values) != n:
                raise ValueError(f"reward function {path!r} returned {len(values)} values for {n} completions")
            if not all(math.isfinite(v) for v in values):
                raise ValueError(
                    f"reward function {path!r} returned a value that is not finite: {[v for v in values if not math.isfinite(v)][:3]}"
                )
            scores = torch.tensor(values)
            total += weight * scores
            means[path] = float(scores.mean()) if n else 0.0
        return total, means
