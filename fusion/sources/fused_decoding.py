"""Greedy decoding from the fused distribution of several sources: the fused teacher.

At every step each selected source gives its distribution over the student's next token, read
from the text so far (`SourcePool` with `unaligned="marginal"` and `boundary="prefix"`: a source
with another tokenizer is read inside its own tokens, never from what comes after), on the union
of the sources' top-K. The fused distribution is the weighted mixture

    p(x) = sum_i w_i p_i(x) / sum_{i with a distribution here} w_i

and the answer takes its most likely token, until the student's end-of-sequence token or the
budget. A source with no distribution at a step (a non-finite position) is left out of that
step's mixture and the others renormalised; the steps where that happened are counted.

Each step runs every selected source once over the whole sequence (no key-value cache): k source
forwards per generated token. That is the ceiling's price, paid once per test prompt; the
student's own answers are decoded by the student alone.
"""

from __future__ import annotations

import math

import torch
from transformers import PreTrainedTokenizerBase

from fusion.data.datamodule import _assemble, _prompt_ids, collate
from fusion.sources.pool import SourcePool


def fusable(pool: SourcePool) -> None:
    """Fused decoding reads every source from the text before each step: the pool must read
    unaligned positions by their marginal and shared boundaries from the prefix."""
    if pool.unaligned != "marginal" or pool.boundary != "prefix":
        raise ValueError(
            "fused decoding needs a SourcePool with unaligned='marginal' and boundary='prefix' (each source read from the "
            f"text so far), got unaligned={pool.unaligned!r} and boundary={pool.boundary!r}"
        )


@torch.no_grad()
def fused_greedy(
    pool: SourcePool,
    prompts: list[str],
    selected: torch.Tensor,
    weights: torch.Tensor,
    student_tokenizer: PreTrainedTokenizerBase,
    max_new_tokens: int,
    max_length: int = 256,
) -> tuple[list[str], dict]:
    """Greedy answers to `prompts` from the fused distribution of their selected sources.

    selected [B, k]: each prompt's source indices in `pool`; weights [B, k]: their weights (need
    not sum to 1). Answers are in the student's tokens, decoded to text. -> (answers, record):
    "steps" (decoding steps run), "renormalised" (prompt-steps where a selected source had no
    distribution) and "renormalised_per_prompt", "source_forwards_per_token" (k).
    """
    fusable(pool)
    size, k = selected.shape
    if weights.shape != (size, k) or len(prompts) != size:
        raise ValueError(
            f"fused_greedy: {len(prompts)} prompts, selected {tuple(selected.shape)} and weights {tuple(weights.shape)} must agree"
        )
    if bool((weights < 0).any()) or bool((weights.sum(-1) <= 0).any()):
        raise ValueError("fused_greedy: weights must be non-negative with a positive sum per prompt")
    selected, weights = selected.to(pool.device), weights.to(pool.device)
    eos, pad = student_tokenizer.eos_token_id, student_tokenizer.pad_token_id
    pad = eos if pad is None else pad
    prompt_ids = _prompt_ids(student_tokenizer, prompts, None)
    answers: list[list[int]] = [[] for _ in prompts]
    open_rows = list(range(size))
    log_weights = weights.clamp(min=0).log()
    record = {"steps": 0, "renormalised": 0, "source_forwards_per_token": k}
    renormalised = torch.zeros(size, dtype=torch.long, device=pool.device)
    for _ in range(max_new_tokens):
        if not open_rows:
            break
        # The end-of-sequence token stands where the next token goes: the sources read only what precedes it.
        features = [_assemble(prompt_ids[r], answers[r], eos, max_length) | {"row": None} for r in open_rows]
        batch = collate(features, pad)
        rows = torch.tensor(open_rows, device=pool.device)
        out = pool.run(selected[rows], {key: batch[key].to(pool.device) for key in ("input_ids", "attention_mask", "targets")}, union=k > 1)
        position = batch["attention_mask"].sum(-1) - 2  # the position that predicts the last token (eos)
        position = position.to(pool.device)
        at = torch.arange(len(open_rows), device=pool.device)
        ids = out.ids[at, :, position]  # [R, k, U]
        logprobs = out.logprobs[at, :, position]  # [R, k, U]
        has = out.aligned[at, :, position] & out.valid & (weights[rows] > 0)  # [R, k]
        record["steps"] += 1
        renormalised[rows] += ((~has) & (weights[rows] > 0)).any(-1).long()
        mix = torch.where(has[..., None], logprobs + log_weights[rows][..., None], -math.inf)  # [R, k, U]
        # With k > 1 every source's log-probabilities are on the same union of ids; with one, its own top-K.
        shared = ids[:, 0] if k == 1 else ids.max(dim=1).values
        fused = torch.logsumexp(mix, dim=1)  # [R, U]
        fused = fused.masked_fill(shared < 0, -math.inf)
        choice = shared.gather(-1, fused.argmax(-1, keepdim=True)).squeeze(-1)  # [R]
        still_open = []
        for row, token, any_source in zip(open_rows, choice.tolist(), has.any(-1).tolist()):
            if not any_source or token < 0 or token == eos:
                continue
            answers[row].append(token)
            still_open.append(row)
        open_rows = still_open
    record |= {"renormalised": int(renormalised.sum()), "renormalised_per_prompt": renormalised.tolist()}
    return student_tokenizer.batch_decode(answers, skip_special_tokens=True), record
