"""The embedded task suite: seeded reasoning-gym generators, short prompts, the tasks' scorers.

Each domain names a reasoning-gym generator, the difficulty that tiny models can learn, and a
template that keeps only the tail of the question (the generators' instruction boilerplate is
long and teaches a character-level model nothing). Answers are the generators' own and are
scored with the generators' own `score_answer`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import reasoning_gym


@dataclass(frozen=True)
class Domain:
    generator: str  # reasoning-gym data set name
    settings: dict[str, Any] = field(default_factory=dict)
    prompt: Callable[[dict[str, Any]], str] = lambda entry: entry["question"]


DOMAINS: dict[str, Domain] = {
    "spell_backward": Domain("spell_backward", {"min_word_len": 3, "max_word_len": 5}, lambda e: f"backward {e['metadata']['word']}="),
    "word_sorting": Domain(
        "word_sorting",
        {"min_words": 2, "max_words": 2, "min_word_length": 3, "max_word_length": 5},
        lambda e: f"sort{'<' if e['metadata']['direction'] == 'ascending' else '>'} {', '.join(e['metadata']['original_words'])}=",
    ),
    "word_sequence_reversal": Domain(
        "word_sequence_reversal", {"min_words": 2, "max_words": 3}, lambda e: f"reverse {', '.join(e['metadata']['words'])}="
    ),
    "chain_sum": Domain(
        "chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}, lambda e: f"{e['metadata']['expression']}="
    ),
}
DEFAULT_DOMAINS = list(DOMAINS)

# Harder settings of the same generators, for out-of-distribution evaluation.
HARDER_SETTINGS: dict[str, dict[str, Any]] = {
    "spell_backward": {"min_word_len": 6, "max_word_len": 7},
    "word_sorting": {"min_words": 3, "max_words": 3},
    "word_sequence_reversal": {"min_words": 4, "max_words": 4},
    "chain_sum": {"min_terms": 3, "max_terms": 3},
}


def _check_domain(name: str) -> Domain:
    if name not in DOMAINS:
        raise ValueError(f"unknown task domain {name!r}; the embedded suite has {sorted(DOMAINS)}")
    return DOMAINS[name]


def _seed(*parts: Any) -> int:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()
    return int(digest[:8], 16)


def generate(domain: str, size: int, seed: int, harder: bool = False) -> list[dict[str, str]]:
    """`size` seeded examples of one domain as rows with prompt, response, domain, metadata."""
    spec = _check_domain(domain)
    settings = {**spec.settings, **(HARDER_SETTINGS.get(domain, {}) if harder else {})}
    generator = reasoning_gym.create_dataset(spec.generator, size=size, seed=seed, **settings)
    rows = []
    for entry in generator:
        rows.append(
            {
                "prompt": spec.prompt(entry),
                "response": entry["answer"],
                "domain": domain,
                "metadata": json.dumps(entry["metadata"], default=str),
            }
        )
    return rows


def is_held_out(prompt: str) -> bool:
    """A fixed fifth of all prompts, by hash: only these may appear in val and test splits.

    The zoo and the student's fusion corpus draw from the rest, so no source has seen an
    evaluation prompt, whatever seeds and sizes the configs choose.
    """
    return _seed(prompt) % 5 == 0


def build_splits(domains: list[str], sizes: dict[str, int | dict[str, int]], seed: int) -> dict[str, list[dict[str, str]]]:
    """Disjoint, seeded splits: `sizes` maps a split name to examples per domain (one number for
    every domain, or domain -> number, 0 for a domain left out).

    "val" and "test" draw from held-out prompts, any other split (train, zoo) from the rest.
    """
    seen: set[str] = set()
    splits: dict[str, list[dict[str, str]]] = {name: [] for name in sizes}
    for domain in domains:
        for split, sizes_of in sizes.items():
            size = sizes_of.get(domain, 0) if isinstance(sizes_of, dict) else sizes_of
            held_out = split in ("val", "test")
            kept: list[dict[str, str]] = []
            for attempt in range(20):
                if len(kept) >= size:
                    break
                chunk = max(64, (6 if held_out else 2) * (size - len(kept)))
                for row in generate(domain, chunk, _seed(seed, domain, split, attempt)):
                    prompt = row["prompt"]
                    if is_held_out(prompt) == held_out and prompt not in seen and len(kept) < size:
                        seen.add(prompt)
                        kept.append(row)
            if len(kept) < size:
                raise ValueError(f"domain {domain!r} has fewer than {size} distinct {split} prompts; lower the size")
            splits[split].extend(kept)
    return splits


@cache
def _scorer(domain: str):
    spec = DOMAINS[domain]
    return reasoning_gym.create_dataset(spec.generator, size=1, seed=0, **spec.settings)


def score(domain: str, prediction: str, row: dict[str, Any]) -> float:
    """The task's own score in [0, 1]; exact string match for domains outside the suite."""
    if domain not in DOMAINS:
        return float(prediction.strip() == str(row["response"]).strip())
    metadata = row.get("metadata") or "{}"
    entry = {
        "question": row["prompt"],
        "answer": row["response"],
        "metadata": json.loads(metadata) if isinstance(metadata, str) else metadata,
    }
    return float(_scorer(domain).score_answer(prediction.strip(), entry))


def is_correct(domain: str, prediction: str, row: dict[str, Any]) -> bool:
    """Exact-match accuracy as judged by the task's scorer (full score)."""
    return score(domain, prediction, row) >= 1.0


def _words(prompt: str) -> list[str]:
    """The comma-separated words of a word task's prompt ("sort< cat, dog=" -> [cat, dog])."""
    return [w.strip() for w in prompt.split(" ", 1)[-1].removesuffix("=").split(",")]


# domain -> (prompt, answer) -> whether the answer has the form the prompt asks for. Each check
# reads the prompt alone and is a necessary condition of a correct answer, never a sufficient one.
def _same_words(prompt: str, answer: str) -> bool:
    return sorted(w.strip() for w in answer.split(",")) == sorted(_words(prompt))


_FORMS: dict[str, Callable[[str, str], bool]] = {
    "spell_backward": lambda prompt, answer: sorted(answer) == sorted(prompt.removeprefix("backward ").removesuffix("=")),
    "word_sorting": _same_words,
    "word_sequence_reversal": _same_words,
    "chain_sum": lambda prompt, answer: re.fullmatch(r"-?\d+", answer) is not None,
}


def well_formed(domain: str, prompt: str, answer: str) -> bool:
    """Whether `answer` has the form `prompt` asks for, judged from the prompt alone (no gold): the
    letters of the word (spell_backward), the words of the list (word_sorting,
    word_sequence_reversal), an integer (chain_sum); outside the suite, any non-empty answer."""
    answer = answer.strip()
    return bool(answer) and _FORMS.get(domain, lambda prompt, answer: True)(prompt, answer)


def _chain_sum(prompt: str) -> int | None:
    """The value of a chain_sum prompt's expression ("15 - 43=" -> -28), or None where the prompt
    is not a chain of integers joined by + and -."""
    expression = prompt.strip().removesuffix("=").replace(" ", "")
    if not re.fullmatch(r"-?\d+([+-]\d+)*", expression):
        return None
    return sum(int(term) for term in re.findall(r"[+-]?\d+", expression))


def _check_chain_sum(prompt: str, answer: str) -> bool:
    value = _chain_sum(prompt)
    if value is None:
        raise ValueError(f"chain_sum's checker cannot read the expression of the prompt {prompt!r}")
    return re.fullmatch(r"-?\d+", answer.strip()) is not None and int(answer.strip()) == value


# domain -> (prompt, answer) -> whether the answer is right, judged from the prompt alone: a
# verifier that needs no gold. Only chain_sum has one here (a calculator); the benchmarks treat
# the word tasks as tasks whose answers only the sources know.
CHECKERS: dict[str, Callable[[str, str], bool]] = {"chain_sum": _check_chain_sum}


def check(domain: str, prompt: str, answer: str) -> bool | None:
    """Whether `answer` is right by the domain's checker (`CHECKERS`), or None where the domain has none."""
    checker = CHECKERS.get(domain)
    return None if checker is None else checker(prompt, answer)
