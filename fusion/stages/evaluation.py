"""Greedy decoding and task scoring, shared by the Lightning modules and the zoo's cards."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fusion.data import tasks


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
