"""Greedy decoding, task scoring and the ratio to the best source, shared by the Lightning
modules, the zoo's cards, the quick start and the benchmarks."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fusion.data import tasks
from fusion.data.datamodule import collate, encode
from fusion.data.tokenizer import load_tokenizer
from fusion.models import load_frozen, resolve_model_path


@torch.no_grad()
def greedy_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: torch.Tensor,  # [B, P], left-padded
    prompt_attention_mask: torch.Tensor,  # [B, P]
    max_new_tokens: int,
) -> list[str]:
    """Greedy completions of left-padded prompts, cut at the first eos."""
    output = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.batch_decode(output[:, prompt_ids.shape[1] :], skip_special_tokens=True)


def correct(answers: list[str], rows: list[dict]) -> list[bool]:
    """Exact-match correctness of each answer, judged by its domain's scorer."""
    return [tasks.is_correct(row["domain"], answer, row) for answer, row in zip(answers, rows)]


def model_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict],
    max_new_tokens: int = 24,
    batch_size: int = 200,
    max_length: int = 64,
) -> dict[str, float]:
    """Greedy exact-match accuracy per domain of `model` reading `rows` in its own tokens:
    `[bos] prompt`, then at most `max_new_tokens` of its own tokens."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    hits: dict[str, list[bool]] = {}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = collate([encode(tokenizer, r["prompt"], r["response"], max_length) | {"row": r} for r in chunk], pad)
        answers = greedy_answers(model, tokenizer, batch["prompt_ids"], batch["prompt_attention_mask"], max_new_tokens)
        for row, ok in zip(chunk, correct(answers, chunk)):
            hits.setdefault(row["domain"], []).append(ok)
    return {domain: sum(v) / len(v) for domain, v in sorted(hits.items())}


def source_accuracy(
    path: str,
    rows: list[dict],
    max_new_tokens: int,
    key: str = "model.sources",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    max_length: int = 64,
) -> dict[str, float]:
    """A source's own greedy accuracy per domain on `rows` (its model and tokenizer, its own
    decoding budget in its own tokens): the ceiling a student distilled from it is measured against."""
    path = resolve_model_path(path, key)
    return model_accuracy(
        load_frozen(path, dtype, trust_remote_code), load_tokenizer(path, trust_remote_code), rows, max_new_tokens, max_length=max_length
    )


def best_sources(source_acc: dict[str, dict[str, float]]) -> dict[str, tuple[str, float]]:
    """domain -> (name, accuracy) of the source that answers it best; ties go to the first listed."""
    best: dict[str, tuple[str, float]] = {}
    for name, acc in source_acc.items():
        for domain, value in acc.items():
            if domain not in best or value > best[domain][1]:
                best[domain] = (name, value)
    return best


def ratio_to_sources(acc: dict[str, float], ceiling: dict[str, float], floor: float = 0.0) -> dict:
    """The student's accuracy per domain divided by the best source's there (`ceiling`).

    A domain where no source scores above `floor` has no ratio (None; listed in "undefined"), so
    nothing is divided by zero. -> {"ratio": {domain: r or None}, "ratio_mean": the mean over the
    domains that have one, "ratio_min": the worst of them (both None when no domain has one),
    "undefined": [domains]}.
    """
    ratio = {d: (acc[d] / ceiling[d] if ceiling.get(d, 0.0) > floor else None) for d in acc}
    defined = [r for r in ratio.values() if r is not None]
    return {
        "ratio": ratio,
        "ratio_mean": sum(defined) / len(defined) if defined else None,
        "ratio_min": min(defined) if defined else None,
        "undefined": [d for d, r in ratio.items() if r is None],
    }
