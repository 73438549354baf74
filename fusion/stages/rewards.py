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
prompt without gold (see `fusion.data.datamodule`) `response` and `metadata` are None. The SRFT
stage adds `demonstration`: the gold answer, or on a prompt without gold the cached answer of the
source it was routed to (`model.demonstrations`; "" where that source wrote nothing). A function
that takes a `response` or `metadata` parameter (or sets `reads_gold = True` on itself) compares
with gold: `Rewards.check_gold` refuses it on prompts without gold, before anything is generated.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from fusion.data import tasks
from fusion.data.datamodule import is_labelled

RewardFunction = Callable[..., list[float]]
GOLD_COLUMNS = ("response", "metadata")  # None on a prompt without gold


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


def verified_or_agreement(
    prompts: list[str],
    completions: list[str],
    domain: list[str],
    response: list[str | None],
    demonstration: list[str | None],
    metadata: list | None = None,
    **columns,
) -> list[float]:
    """`task_correct` on a row with gold; on a row without gold, 1 where the completion equals the
    row's demonstration (the answer of the source the fusion method routed the prompt to, see
    `fusion.stages.srft`'s `model.demonstrations`; surrounding whitespace ignored), else 0, and 0
    where that answer is empty (nothing to agree with).

    It reads gold only where a row has it, so it is accepted on prompts without gold
    (`reads_gold = False`): there the reward is agreement with the routed source, a proxy for
    correctness as good as that source is on the prompt's domain.
    """
    metadata = metadata if metadata is not None else [None] * len(completions)
    rewards = [0.0] * len(completions)
    gold = [i for i, answer in enumerate(response) if answer is not None]
    verified = task_correct(
        [prompts[i] for i in gold],
        [completions[i] for i in gold],
        [domain[i] for i in gold],
        [response[i] for i in gold],
        [metadata[i] for i in gold],
    )
    for i, value in zip(gold, verified):
        rewards[i] = value
    for i, answer in enumerate(response):
        if answer is None and demonstration[i]:
            rewards[i] = float(completions[i].strip() == demonstration[i].strip())
    return rewards


verified_or_agreement.reads_gold = False


def checked_or_agreement(
    prompts: list[str], completions: list[str], domain: list[str], response: list[str | None], **columns
) -> list[float]:
    """`verified_or_agreement`, except on a row without gold whose domain has a checker that
    needs none (`tasks.CHECKERS`, e.g. chain_sum's calculator): there the checker's {0, 1}
    verdict. A verifier on every prompt of such a domain, and agreement with the routed source
    where there is neither gold nor a checker."""
    rewards = verified_or_agreement(prompts, completions, domain, response, **columns)
    for i, (prompt, completion, d, gold) in enumerate(zip(prompts, completions, domain, response)):
        if gold is None and (verdict := tasks.check(d, prompt, completion)) is not None:
            rewards[i] = float(verdict)
    return rewards


checked_or_agreement.reads_gold = False


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


def reads_gold(function: RewardFunction) -> bool:
    """Whether `function` compares answers with gold: its own `reads_gold` attribute where it sets
    one, else whether it takes a `response` or `metadata` parameter (a function that reads them
    out of `**columns` cannot be told apart, so it says so with `reads_gold = True`)."""
    declared = getattr(function, "reads_gold", None)
    if declared is not None:
        return bool(declared)
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin or extension callable without a signature
        return False
    return any(name in parameters for name in GOLD_COLUMNS)


class Rewards:
    """Weighted reward functions; calling them checks every answer.

    A function that returns a different number of values than completions, or a value that is not
    a finite number, stops training with an error that names the function: the function is
    wrong. A function that raises on some completions (a verifier given a malformed rollout) gives
    those completions reward 0, counted (`errors` in the means, logged as `reward/errors`) and
    warned about once per function: one odd rollout does not end a run. A function that compares
    with gold is refused on prompts without gold (`check_gold`), naming it and its setting.
    """

    def __init__(self, spec: dict[str, float], key: str = "model.rewards"):
        if not spec:
            raise ValueError(f"{key} is empty; name at least one reward function, e.g. {{'fusion.stages.rewards.task_score': 1.0}}")
        self.key = key
        self.functions: dict[str, tuple[RewardFunction, float]] = {}
        for path, weight in spec.items():
            if not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"{key}[{path!r}]: the weight must be a finite number, got {weight!r}")
            self.functions[path] = (resolve(path, f"{key}[{path!r}]"), float(weight))
        self.gold_readers = [path for path, (function, _) in self.functions.items() if reads_gold(function)]
        self.warned: set[str] = set()  # the functions whose raising was already warned about

    def check_gold(self, rows: list[dict[str, Any]], where: str) -> None:
        """Refuse `rows` without gold when a function compares with gold: an error that names the
        function and its setting, meant to run before anything is generated for those rows."""
        missing = sum(not is_labelled(row) for row in rows)
        if missing and self.gold_readers:
            self._refuse(self.gold_readers[0], missing, where)

    def _refuse(self, path: str, missing: int, where: str) -> None:
        raise ValueError(
            f"{self.key}[{path!r}] compares answers with the gold one (it reads {' or '.join(GOLD_COLUMNS)}), and {where} has "
            f"{missing} prompt(s) without gold: use a reward function that reads no gold (e.g. "
            "'fusion.stages.rewards.answer_format', or in SRFT 'fusion.stages.rewards.verified_or_agreement') "
            "or leave out the prompts without gold"
        )

    def __call__(self, prompts: list[str], completions: list[str], columns: dict[str, list[Any]]) -> tuple[torch.Tensor, dict[str, float]]:
        """The weighted reward of each completion [n], and each function's mean and `errors` (the
        completions whose function raised, each scored 0) for logging."""
        n = len(completions)
        total = torch.zeros(n)
        means, errors = {}, 0
        for path, (function, weight) in self.functions.items():
            if path in self.gold_readers:
                missing = sum(gold is None for gold in columns.get("response", [None] * n))
                if missing:
                    self._refuse(path, missing, "this batch")
            try:
                values = _checked(path, function(prompts, completions, **columns), n)
            except _WrongValues:
                raise
            except Exception:  # scored again one completion at a time, to find the ones it raises on
                values, failed = self._one_by_one(path, function, prompts, completions, columns)
                errors += failed
            scores = torch.tensor(values)
            total += weight * scores
            means[path] = float(scores.mean()) if n else 0.0
        means["errors"] = float(errors)
        return total, means

    def _one_by_one(
        self, path: str, function: RewardFunction, prompts: list[str], completions: list[str], columns: dict[str, list[Any]]
    ) -> tuple[list[float], int]:
        """The batch call raised: each completion scored alone, 0 where the call raises. -> (values, how many raised)."""
        values, failed, last = [], 0, None
        for i in range(len(completions)):
            try:
                result = function(prompts[i : i + 1], completions[i : i + 1], **{key: column[i : i + 1] for key, column in columns.items()})
            except Exception as error:
                values.append(0.0)
                failed, last = failed + 1, error
                continue
            values += _checked(path, result, 1)
        if failed and path not in self.warned:
            self.warned.add(path)
            rank_zero_warn(
                f"reward function {path!r} raised {type(last).__name__}: {last} on {failed} of {len(completions)} completions; "
                "each scores 0 (counted in reward/errors; this warning is not repeated)"
            )
        return values, failed


class _WrongValues(ValueError):
    """A reward function returned what no completion explains: the function is wrong."""


def _checked(path: str, values: Any, n: int) -> list[float]:
    """`values` as n finite floats, or an error naming the function."""
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError) as error:
        raise _WrongValues(f"reward function {path!r} must return a list of numbers: {error}") from error
    if len(values) != n:
        raise _WrongValues(f"reward function {path!r} returned {len(values)} values for {n} completions")
    if not all(math.isfinite(v) for v in values):
        raise _WrongValues(
            f"reward function {path!r} returned a value that is not finite: {[v for v in values if not math.isfinite(v)][:3]}"
        )
    return values
