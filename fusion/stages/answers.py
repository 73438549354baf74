"""Answers for the prompts without gold: the student learns along the answer of a source.

Who writes a prompt's answer is the method's `answers` column (`fusion.objectives.methods`):

    first_selected  the first of the sources that will run along the answer (the selector's top
                    source, the single source, the domain's specialist): one generation
    random          a source drawn by a hash of the prompt (`uniform`): the same one every epoch
    most_confident  every source answers, and the answer its writer is most confident in wins:
                    the highest log-probability per student token (`confidence`, the label-free
                    AvgCE: N generations)

The answer is written in the writer's own tokens (`SourcePool.answer`), then re-encoded for the
student and trained on exactly as gold is (`along_answers`). With the selector and `answer_from:
fused`, the writer is the weighed sources of the top-k together (`FUSED_WRITER`): greedy decoding
from their mixture with equal weights, in student tokens (`fusion.sources.fused_decoding`), one
forward of each of them per answer token. With the offline cache, the answers were written by
`predict` and are read from the cache instead.
"""

from __future__ import annotations

import torch

from fusion.data.datamodule import collate, encode
from fusion.sources.cache import row_key
from fusion.sources.fused_decoding import fused_greedy
from fusion.sources.pool import SourcePool
from fusion.stages.fusion_settings import FusionSettings

FUSED_WRITER = -2  # an answer's writer when the weighed sources wrote it together (-1: gold, in the cache)


@torch.no_grad()
def write_answers(
    rows: list[dict],
    sources: list[list[int]],
    pool: SourcePool,
    tokenizer,
    settings: FusionSettings,
    weighed: list[list[bool]] | None = None,
) -> list[dict]:
    """Online: who writes the answer to each of the `rows` (prompts without gold), and the answer.

    sources: per row, the sources that will run along its answer; weighed: which of them are
    weighed (`Router.weighed`; None: all). -> per row: text (without surrounding white space,
    as gold is trained on), writer, generations (how many sources wrote an answer), sources. An
    empty answer loses to any other (`most_confident`).
    """
    if settings.answer_from == "fused":
        return fused_answers(rows, sources, pool, tokenizer, settings, weighed)
    n, method = len(settings.sources), settings.method
    if method.answers == "most_confident":
        writers = [list(range(n)) for _ in rows]
    elif method.answers == "random":
        writers = [[int(row_key(row), 16) % n] for row in rows]
    else:
        writers = [[chosen[0]] for chosen in sources]
    prompts = [row["prompt"] for row in rows]
    texts: dict[tuple[int, int], tuple[str, float]] = {}  # (row, source) -> (answer, log-prob per student token)
    for source in sorted({s for w in writers for s in w}):
        mine = [i for i, w in enumerate(writers) if source in w]
        written, logprob = pool.answer(
            source, [prompts[i] for i in mine], settings.response_max_new_tokens, settings.response_sampling, settings.response_temperature
        )
        for i, text, value in zip(mine, written, logprob.tolist()):
            text = text.strip()
            tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # + eos
            texts[(i, source)] = (text, value / tokens)
    answers = []
    for i, chosen in enumerate(sources):
        writer = max(writers[i], key=lambda s: (bool(texts[(i, s)][0]), texts[(i, s)][1]))
        answers.append({"text": texts[(i, writer)][0], "writer": writer, "generations": len(writers[i]), "sources": chosen})
    return answers


def fused_answers(
    rows: list[dict], sources: list[list[int]], pool: SourcePool, tokenizer, settings: FusionSettings, weighed: list[list[bool]] | None
) -> list[dict]:
    """The weighed sources of each row's top-k write its answer together (`write_answers` with
    `answer_from: fused`): greedy from their equal-weight mixture, every source read from the text
    so far. `generations` is the number of sources that decoded it; `renormalised` the steps where
    one of them had no distribution (left out of that step's mixture, the rest renormalised)."""
    selected = torch.tensor(sources)
    weights = torch.ones(selected.shape) if weighed is None else torch.tensor(weighed, dtype=torch.float)
    reader = pool.reading("marginal", "prefix")
    texts, record = fused_greedy(reader, [row["prompt"] for row in rows], selected, weights, tokenizer, settings.response_max_new_tokens)
    return [
        {"text": text.strip(), "writer": FUSED_WRITER, "generations": int(w.sum()), "sources": chosen, "renormalised": steps}
        for text, w, chosen, steps in zip(texts, weights, sources, record["renormalised_per_prompt"])
    ]


def along_answers(batch: dict, answers: dict[int, dict], tokenizer, max_length: int) -> dict:
    """The batch re-encoded in student tokens along the answers (row index -> answer), the other
    rows along their gold, with `answers` (per row: None, or the answer) and `answer_sources`
    [B, k] (the sources that run along each answer; -1 on a row along gold). An empty answer
    gives its row no trained position."""
    rows = batch["rows"]
    k = len(next(iter(answers.values()))["sources"])
    answer_sources = torch.full((len(rows), k), -1, dtype=torch.long)
    per_row: list[dict | None] = [None] * len(rows)
    for b, answer in answers.items():
        answer_sources[b] = torch.tensor(answer["sources"])
        per_row[b] = answer
    features = []
    for row, answer in zip(rows, per_row):
        response = row["response"] if answer is None else (answer["text"] or None)
        features.append(encode(tokenizer, row["prompt"], response, max_length) | {"row": row})
    device = batch["input_ids"].device
    collated = collate(features, tokenizer.pad_token_id)
    answered = {key: value.to(device) if torch.is_tensor(value) else value for key, value in collated.items()}
    answered["answers"], answered["answer_sources"] = per_row, answer_sources.to(device)
    return answered
