"""The frozen source LLMs as one pool: each source runs only on the sequences that selected it,
and its outputs are read over the student's vocabulary, whatever its tokenizer (models load
through `fusion.models`).
"""

from __future__ import annotations

import copy
import inspect
import math
import os
from typing import NamedTuple

import torch
from transformers import PreTrainedTokenizerBase

from fusion.data import IGNORE_INDEX
from fusion.data.datamodule import collate, encode
from fusion.data.tokenizer import load_tokenizer
from fusion.models import load_frozen, named_load, resolve_model_path, same_vocabulary
from fusion.sources.alignment import Aligner
from fusion.sources.marginal import TokenPrefixes, marginal_dense, marginal_topk, move_mass, move_mass_dense
from fusion.sources.vocab_map import METHODS as VOCAB_MAP_METHODS
from fusion.sources.vocab_map import build_vocab_map, project_dense, project_topk

UNALIGNED_POLICIES = ("mask", "gold_onehot", "marginal")
BOUNDARY_READS = ("token_end", "prefix")  # model.boundary (see `fusion.sources.marginal`)


def check_boundary(boundary: str | None, unaligned: str, null_ok: bool = False) -> None:
    """`model.boundary` against `model.unaligned`: "prefix" reads sources inside their tokens (`marginal`)."""
    if boundary not in (*((None,) if null_ok else ()), *BOUNDARY_READS) or (boundary == "prefix" and unaligned != "marginal"):
        raise ValueError(
            f"model.boundary must be {'null or ' if null_ok else ''}one of {BOUNDARY_READS} ('prefix' reads sources inside "
            f"their tokens: it needs model.unaligned 'marginal'), got {boundary!r} with unaligned {unaligned!r}"
        )


def source_name(path: str) -> str:
    """A source is named by the last part of its path (model.single_source, model.oracle, the logs)."""
    return os.path.basename(os.path.normpath(path))


class SourceOutputs(NamedTuple):
    """What the selected sources said about a batch, over the student's vocabulary, sparse.

    ids [B, k, T, K]: each source's top-K student token ids per student position (-1 empty);
    logprobs [B, k, T, K]: their log-probabilities at the distillation temperature;
    ce [B, k]: the source's CE on the gold response at T = 1, per student trained token;
    valid [B, k]: False where the source's logits were not finite on a trained position (such
    a pair has zero ce and no support, and must not be used);
    aligned [B, k, T]: True where the source has a distribution for that student position.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    ce: torch.Tensor
    valid: torch.Tensor
    aligned: torch.Tensor


def gold_onehot(
    ids: torch.Tensor, logprobs: torch.Tensor, aligned: torch.Tensor, valid: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`unaligned: gold_onehot`: where a usable source has no distribution at a trained position,
    a one-hot of the token the student learns along there (probability 1, empty tail), counted
    as aligned. ids, logprobs [B, k, T, K] (written in place), aligned [B, k, T], valid [B, k],
    targets [B, T] -> (ids, logprobs, aligned)
    """
    k = ids.shape[1]
    trained = targets != IGNORE_INDEX  # [B, T]
    fill = trained[:, None, :] & ~aligned & valid[:, :, None]  # [B, k, T]
    ids[..., 0] = torch.where(fill, targets[:, None, :].expand(-1, k, -1), ids[..., 0])
    logprobs[..., 0] = torch.where(fill, 0.0, logprobs[..., 0])
    ids[..., 1:] = torch.where(fill[..., None], -1, ids[..., 1:])
    logprobs[..., 1:] = torch.where(fill[..., None], -math.inf, logprobs[..., 1:])
    return ids, logprobs, aligned | fill


class SourcePool:
    """N frozen sources, kept out of the LightningModule's state dict (checkpoints never hold them).

    Each source's outputs are expressed over the student's vocabulary as top-K sparse
    distributions. A source with the student's own tokenizer is read position by position; any
    other is aligned by byte offsets (`fusion.sources.alignment`) and its tokens mapped onto the
    student's vocabulary (`fusion.sources.vocab_map`). A student position where such a source has no
    exact boundary gets the source's distribution over the bytes that follow, read inside the
    source's token (`unaligned="marginal"`, `fusion.sources.marginal`), a one-hot of the gold token
    (`"gold_onehot"`), or nothing from that source (`"mask"`). At a shared boundary the source's
    next-token distribution assumes its token ended there (`boundary="token_end"`), or
    (`"prefix"`, with `marginal`) it is read from the text before the boundary only, as the
    student's own samples need (`fusion.sources.marginal`).
    """

    def __init__(
        self,
        models: list,
        tokenizers: list[PreTrainedTokenizerBase],
        names: list[str],
        student_tokenizer: PreTrainedTokenizerBase,
        top_k: int = 10,
        unaligned: str = "marginal",
        vocab_map: str = "exact+med",
        vocab_map_dir: str | None = None,
        boundary: str = "token_end",
    ):
        """Frozen models in memory with their tokenizers (`load` reads them from paths).

        `vocab_map_dir`: where the vocabulary maps of sources with another tokenizer are cached
        (None: built every time, not cached; the fusion module passes `model.vocab_map_dir` or
        the per-user cache, `fusion.sources.vocab_map.default_cache_dir`)."""
        if unaligned not in UNALIGNED_POLICIES:
            raise ValueError(f"model.unaligned must be one of {UNALIGNED_POLICIES}, got {unaligned!r}")
        check_boundary(boundary, unaligned)
        if vocab_map not in VOCAB_MAP_METHODS:
            raise ValueError(f"model.vocab_map must be one of {VOCAB_MAP_METHODS}, got {vocab_map!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"model.sources: source directory names must be unique, got {names}")
        self.names, self.models, self.tokenizers = list(names), list(models), list(tokenizers)
        self.vocab_size = len(student_tokenizer)
        self.top_k = min(top_k, self.vocab_size)
        self.unaligned, self.boundary = unaligned, boundary
        self.aligners, self.vocab_maps, self.prefixes = [], [], []
        for index, (model, tokenizer) in enumerate(zip(models, tokenizers)):
            key = f"model.sources[{index}]"
            rows = model.get_output_embeddings().weight.shape[0]
            if rows < len(tokenizer):
                raise ValueError(f"{key}: the model has {rows} output rows, fewer than the {len(tokenizer)} tokens of its tokenizer")
            aligner = vocab_map_rows = prefixes = None
            if not same_vocabulary(student_tokenizer, tokenizer):
                try:
                    aligner = Aligner(student_tokenizer, tokenizer)
                    vocab_map_rows = build_vocab_map(tokenizer, student_tokenizer, rows, vocab_map, vocab_map_dir)
                except ValueError as error:
                    raise ValueError(f"{key}: {error}") from error
                if unaligned == "marginal":
                    prefixes = TokenPrefixes(aligner.source_bytes, aligner.student_text, rows)
            self.aligners.append(aligner)
            self.vocab_maps.append(vocab_map_rows)
            self.prefixes.append(prefixes)
        self.device = torch.device("cpu")
        self.coverage: dict[str, float] = {}  # trained student positions with the source's distribution, in the last run
        self._readings: dict[tuple[str, str], SourcePool] = {}  # (unaligned, boundary) -> a view (`reading`)

    @classmethod
    def load(
        cls,
        paths: list[str],
        student_tokenizer: PreTrainedTokenizerBase,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        **settings,
    ) -> SourcePool:
        """The sources at `paths` (model directories or hub names), frozen; `settings`: `__init__`'s."""
        models, tokenizers = [], []
        for index, path in enumerate(paths):
            key = f"model.sources[{index}]"
            path = resolve_model_path(path, key)
            with named_load(key, path):
                tokenizers.append(load_tokenizer(path, trust_remote_code))
                models.append(load_frozen(path, dtype, trust_remote_code))
        return cls(models, tokenizers, [source_name(p) for p in paths], student_tokenizer, **settings)

    def __len__(self) -> int:
        return len(self.models)

    def reading(self, unaligned: str, boundary: str) -> SourcePool:
        """The same sources (the same models in memory), read with other `unaligned` and `boundary`
        settings: fused decoding (`fusion.sources.fused_decoding`) reads every source from the
        text so far, whatever the training pool reads."""
        if (unaligned, boundary) == (self.unaligned, self.boundary):
            return self
        kept = self._readings.get((unaligned, boundary))
        if kept is not None and kept.device == self.device:
            return kept
        check_boundary(boundary, unaligned)
        if unaligned not in UNALIGNED_POLICIES:
            raise ValueError(f"model.unaligned must be one of {UNALIGNED_POLICIES}, got {unaligned!r}")
        view = copy.copy(self)
        view.unaligned, view.boundary, view.coverage = unaligned, boundary, {}
        if unaligned == "marginal":
            view.prefixes = [
                prefixes if prefixes is not None or aligner is None else TokenPrefixes(aligner.source_bytes, aligner.student_text, rows)
                for prefixes, aligner, rows in zip(
                    self.prefixes, self.aligners, (m.get_output_embeddings().weight.shape[0] for m in self.models)
                )
            ]
            view.prefixes = [p.to(self.device) if p is not None else None for p in view.prefixes]
        view._readings = {}
        self._readings[(unaligned, boundary)] = view
        return view

    def to(self, device: torch.device) -> SourcePool:
        if device != self.device:
            self.models = [m.to(device) for m in self.models]
            self.vocab_maps = [m.to(device) if m is not None else None for m in self.vocab_maps]
            self.prefixes = [p.to(device) if p is not None else None for p in self.prefixes]
            self.device = device
        return self

    @torch.no_grad()
    def run(self, selected: torch.Tensor, batch: dict, temperature: float = 1.0, union: bool = False) -> SourceOutputs:
        """Run each source only on the sequences that selected it. selected [B, k] source indices.

        Each source keeps its own top-K (`union=False`, what the cache stores), or (`union=True`,
        online training) every selected source's log-probability on the union of the selected
        sources' top-K, so that the fused target on that union is the sources' true mixture:
        with own supports only, a source's mass on an id in another's top-K but not its own
        would fall into the tail.
        """
        input_ids, targets = batch["input_ids"], batch["targets"]
        (size, k), length, device = selected.shape, input_ids.shape[1], input_ids.device
        ids = torch.full((size, k, length, self.top_k), -1, device=device)
        logprobs = torch.full((size, k, length, self.top_k), -math.inf, device=device)
        ce = torch.zeros(size, k, device=device)
        valid = torch.ones(size, k, dtype=torch.bool, device=device)
        aligned = torch.zeros(size, k, length, dtype=torch.bool, device=device)
        trained = targets != IGNORE_INDEX  # [B, T] student positions that carry a target
        union = union and k > 1
        tables = []  # (rows, slots, usable [R, T], [P, V] student-vocabulary log-probs at the usable positions)
        for index, model in enumerate(self.models):
            rows, slots = (selected == index).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            one, table = self._run_one(index, model, input_ids[rows], batch["attention_mask"][rows], targets[rows], temperature, union)
            ids[rows, slots], logprobs[rows, slots], aligned[rows, slots] = one.ids, one.logprobs, one.aligned
            ce[rows, slots], valid[rows, slots] = one.ce, one.valid
            self.coverage[self.names[index]] = float(one.aligned.sum() / trained[rows].sum().clamp(min=1))
            if union:
                tables.append((rows, slots, one.aligned, table))
        if union:
            ids, logprobs = _on_union(ids, aligned, tables)
        if self.unaligned == "gold_onehot":  # the gold token, certain, where a source has no boundary
            ids, logprobs, aligned = gold_onehot(ids, logprobs, aligned, valid, targets)
        return SourceOutputs(ids, logprobs, ce, valid, aligned)

    def _run_one(self, index: int, model, input_ids, attention_mask, targets, temperature: float, table: bool = False):
        """One source on its rows ([R, T] student tensors) -> SourceOutputs without the k axis, and
        (with `table`) its log-probabilities over the student's vocabulary at the usable positions [P, V].

        Everything after the forward runs on trained positions only (the response, not the prompt).
        """
        trained = targets != IGNORE_INDEX  # [R, T]
        view = self._source_view(index, input_ids, attention_mask, targets, trained)
        logp, slot = self._source_logprobs(model, view, trained)  # [Q', V_source] at T = 1
        # NaN or +inf anywhere in a position's logits makes its whole log-softmax NaN; a -inf
        # logit alone is a legitimate zero probability. topk ranks NaN above every number, so a
        # position's first top-K entry is NaN exactly when its log-softmax holds one.
        top = logp.topk(self.top_k, dim=-1) if view.position_map is None and temperature == 1.0 else None
        finite, ce = _source_ce(view, logp, slot, trained, top)
        if temperature != 1.0:
            logp = torch.log_softmax(logp / temperature, -1)  # softmax(z / T): log p / T differs from z / T by a constant per row
        if view.position_map is None:  # the student's tokenizer: `logp` rows are the trained positions, in order
            usable, (top_logprobs, top_ids), dense = self._read_in_place(logp, top, trained, finite, view.trained_rows)
        else:
            usable = trained & (view.position_map >= 0) & finite[:, None]
            reads = self._aligned_reads(index, view, logp, slot, targets, usable)
            if table:  # exact: every source token's mass carried to its student token
                dense = self._dense_at(index, reads, logp)
                top_logprobs, top_ids = dense.topk(self.top_k, dim=-1)
            else:
                dense = None
                top_logprobs, top_ids = self._topk_at(index, reads, logp)
        out_ids, out_logprobs = _spread(usable, top_ids, top_logprobs, self.top_k)
        return SourceOutputs(out_ids, out_logprobs, ce, finite, usable), (dense if table else None)

    def _source_view(self, index: int, input_ids, attention_mask, targets, trained) -> _SourceView:
        """Source `index`'s view of the rows: the rows in its own tokens, and (with another tokenizer)
        the source position each student position reads, inside a source token or at a boundary."""
        aligner, prefixes = self.aligners[index], self.prefixes[index]
        if aligner is None:  # the student's tokenizer: position t is position t
            return _SourceView(input_ids, attention_mask, targets, trained, trained.nonzero(as_tuple=True)[0])
        side = aligner(input_ids, attention_mask, targets)
        source_ids, source_mask, source_targets = (t.to(input_ids.device) for t in (side.input_ids, side.attention_mask, side.targets))
        position_map = side.position_map.to(input_ids.device)  # [R, T] source position or -1
        inside = inside_offset = spelled_token = from_prefix = ending = None
        if prefixes is not None:  # positions inside a source token, read from the position before it
            inside_offset = side.inside_offset.to(input_ids.device)
            inside_position = side.inside_position.to(input_ids.device)
            spelled_token = source_ids.gather(1, (inside_position + 1).clamp(min=0))  # [R, T] the token c is inside of
            inside = trained & (inside_position >= 0) & (prefixes.length[spelled_token] > inside_offset)
            position_map = torch.where(inside, inside_position, position_map)  # exact boundaries keep theirs
            if self.boundary == "prefix":  # shared boundaries read from the text before them (`fusion.sources.marginal`)
                ending = source_ids.gather(1, position_map.clamp(min=0))  # [R, T] the source token that ends there
                # The response's start is a boundary for certain (the prompt is tokenized apart), and the
                # position before the prompt's last token was never trained: read it as it is.
                in_response = source_targets.gather(1, (position_map - 1).clamp(min=0)) != IGNORE_INDEX
                from_prefix = trained & ~inside & (position_map >= 1) & (prefixes.length[ending] > 0) & in_response  # not a special token
        source_trained = source_targets != IGNORE_INDEX  # [R, T_source]
        rows = source_trained.nonzero(as_tuple=True)[0]  # the Q trained source positions' rows, row-major
        return _SourceView(
            source_ids,
            source_mask,
            source_targets,
            source_trained,
            rows,
            side,
            position_map,
            inside,
            inside_offset,
            spelled_token,
            from_prefix,
            ending,
        )

    def _source_logprobs(self, model, view: _SourceView, trained) -> tuple[torch.Tensor, torch.Tensor]:
        """The source's forward, its output layer only where it is read: its trained positions and
        those the student's positions read. -> log-probabilities at T = 1 [Q', V_source], row-major
        over those positions, and `slot` [R, T_source]: each position's row of them (-1 unread)."""
        keep = view.trained.clone()  # the source positions whose logits are needed
        if view.position_map is not None:
            mapped = trained & (view.position_map >= 0)
            keep[mapped.nonzero(as_tuple=True)[0], view.position_map[mapped]] = True
            if view.from_prefix is not None:
                keep[view.from_prefix.nonzero(as_tuple=True)[0], view.position_map[view.from_prefix] - 1] = True
        logits = _logits_at(model, view.ids, view.mask, keep)  # [Q', V_source], row-major over `keep`
        if view.position_map is None:  # the student's tokenizer
            logits = logits[:, : self.vocab_size]  # rows past the tokenizer (padded embeddings)
        slot = torch.full(keep.shape, -1, dtype=torch.long, device=logits.device)
        slot[keep] = torch.arange(len(logits), device=logits.device)
        return torch.log_softmax(logits, -1), slot

    def _read_in_place(self, logp, top, trained, finite, trained_rows):
        """A source with the student's tokenizer, read position by position on its finite rows.
        -> usable [R, T], (top-K log-probs, ids) [P, K], and the log-probabilities there [P, V]."""
        usable = trained & finite[:, None]  # [R, T]; the trained source positions are the student's
        keep_rows = finite[trained_rows]
        dense = logp if bool(keep_rows.all()) else logp[keep_rows]
        if top is None:
            top = dense.topk(self.top_k, dim=-1)
        elif not bool(keep_rows.all()):
            top = (top[0][keep_rows], top[1][keep_rows])
        return usable, top, dense

    def _aligned_reads(self, index: int, view: _SourceView, logp, slot, targets, usable) -> _AlignedReads:
        """Where each usable student position (another tokenizer) reads the source's log-probabilities:
        at a shared boundary, inside a source token, before the token ending at a boundary
        (`boundary: prefix`), and where the student's token spans several source tokens."""
        rows, positions = usable.nonzero(as_tuple=True)
        read = slot[rows, view.position_map[rows, positions]]  # [P] each position's row of `logp`
        prefixes = self.prefixes[index]
        at = view.inside[rows, positions].nonzero(as_tuple=True)[0] if prefixes is not None else rows[:0]  # [P'] of the P
        boundary = rows[:0] if len(at) == 0 else (~view.inside[rows, positions]).nonzero(as_tuple=True)[0]
        tokens = spelled = ended_token = mix_read = None
        if len(at):
            tokens, spelled = view.spelled_token[rows[at], positions[at]], view.inside_offset[rows[at], positions[at]]
        spans = (
            self._spanning(index, view.side, view.ids, view.targets, logp, slot, targets, rows, positions) if prefixes is not None else None
        )
        mix = rows[:0] if view.from_prefix is None else view.from_prefix[rows, positions].nonzero(as_tuple=True)[0]  # [P''] of the P
        if len(mix):  # the token ending at the boundary, whole, read before it
            ended_token = view.ending[rows[mix], positions[mix]]
            mix_read = slot[rows[mix], view.position_map[rows[mix], positions[mix]] - 1]
        return _AlignedReads(read, at, boundary, tokens, spelled, mix, ended_token, mix_read, spans)

    def _dense_at(self, index: int, reads: _AlignedReads, logp) -> torch.Tensor:
        """The source's exact log-probabilities over the student's vocabulary at the usable positions
        [P, V]: every source token's mass carried to its student token (the online union's table)."""
        prefixes, r = self.prefixes[index], reads
        dense = project_dense(logp[r.read], self.vocab_maps[index], self.vocab_size)
        if len(r.at):
            dense[r.at] = marginal_dense(prefixes, logp, r.read[r.at], r.tokens, r.spelled, self.vocab_size)
        if len(r.mix):
            dense[r.mix] = marginal_dense(
                prefixes, logp, r.mix_read, r.ended_token, prefixes.length[r.ended_token], self.vocab_size, ended=dense[r.mix]
            )
        if r.spans is not None:
            where, first, spanning, log_mass = r.spans
            dense[where] = move_mass_dense(dense[where], first, spanning, log_mass)
        return dense

    def _topk_at(self, index: int, reads: _AlignedReads, logp) -> tuple[torch.Tensor, torch.Tensor]:
        """The source's top-K over the student's vocabulary at the usable positions, without the dense
        [P, V] table (what the cache stores). -> (log-probabilities, student ids) [P, K]."""
        prefixes, vocab_map, r = self.prefixes[index], self.vocab_maps[index], reads
        if len(r.at) == 0:
            top_ids, top_logprobs = project_topk(logp[r.read], vocab_map, self.top_k)
        else:
            top_ids = torch.full((len(r.read), self.top_k), -1, device=logp.device)
            top_logprobs = torch.full((len(r.read), self.top_k), -math.inf, device=logp.device)
            top_ids[r.boundary], top_logprobs[r.boundary] = project_topk(logp[r.read[r.boundary]], vocab_map, self.top_k)
            top_ids[r.at], top_logprobs[r.at] = marginal_topk(prefixes, logp, r.read[r.at], r.tokens, r.spelled, self.top_k)
        if len(r.mix):
            top_ids[r.mix], top_logprobs[r.mix] = marginal_topk(
                prefixes,
                logp,
                r.mix_read,
                r.ended_token,
                prefixes.length[r.ended_token],
                self.top_k,
                ended=(top_ids[r.mix], top_logprobs[r.mix]),
            )
        if r.spans is not None:
            where, first, spanning, log_mass = r.spans
            top_ids[where], top_logprobs[where] = move_mass(top_ids[where], top_logprobs[where], first, spanning, log_mass, self.top_k)
        return top_logprobs, top_ids

    def _spanning(self, index: int, side, source_ids, source_targets, logp, slot, targets, rows, positions):
        """Where the student's next token spans several source tokens from a shared boundary (of the
        P usable positions `rows`, `positions`): which, the student token the first source token
        was carried to, the student's token, and log P(the source spells it) along the text: the
        source's gold log-probabilities over the tokens inside it, then the mass of the tokens
        beginning with the last one's bytes inside it. None where there is no such position."""
        span_last, span_spelled = side.span_last.to(logp.device), side.span_spelled.to(logp.device)
        where = (span_last[rows, positions] >= 0).nonzero(as_tuple=True)[0]
        if len(where) == 0:
            return None
        r, t = rows[where], positions[where]
        start, last = side.position_map.to(logp.device)[r, t], span_last[r, t]
        trained = source_targets != IGNORE_INDEX
        gold = torch.zeros(source_targets.shape, device=logp.device)
        gold[trained] = logp[slot[trained], source_targets[trained]]
        before = torch.nn.functional.pad(gold.cumsum(1), (1, 0))  # [R, T_source + 1]: sum over positions < i
        along = before[r, last] - before[r, start]  # the tokens before the last one, each certain of its successor
        log_mass = along + self.prefixes[index].log_mass(logp, slot[r, last], source_ids[r, last + 1], span_spelled[r, t])
        return where, self.vocab_maps[index][source_ids[r, start + 1]], targets[r, t], log_mass

    @torch.no_grad()
    def answer(
        self, index: int, prompts: list[str], max_new_tokens: int, sampling: bool = False, temperature: float = 1.0
    ) -> tuple[list[str], torch.Tensor]:
        """Source `index` answers each prompt in its own tokens: `[bos] prompt`, then greedy
        decoding (or sampling at `temperature`) up to its eos or `max_new_tokens`.

        -> the decoded answers (special tokens skipped) and the log-probability the source gives
        each of its answers, eos included, at temperature 1 [R]: its confidence in its own answer.
        """
        tokenizer, model = self.tokenizers[index], self.models[index]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        width = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 1024)
        features = [
            encode(tokenizer, prompt, None, max(1, width - max_new_tokens)) | {"row": {"prompt": prompt, "response": None}}
            for prompt in prompts
        ]
        batch = collate(features, pad)
        prompt_ids, attention = batch["prompt_ids"].to(self.device), batch["prompt_attention_mask"].to(self.device)
        options = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if sampling else {"do_sample": False}
        output = model.generate(
            input_ids=prompt_ids,
            attention_mask=attention,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
            output_logits=True,
            return_dict_in_generate=True,
            **options,
        )
        generated = output.sequences[:, prompt_ids.shape[1] :]  # [R, L]
        # A token counts up to and including the first eos; what generate pads after it does not.
        is_eos = generated == tokenizer.eos_token_id
        before_eos = (is_eos.long().cumsum(-1) - is_eos.long()) == 0  # [R, L]
        logprob = torch.zeros(generated.shape[0], device=generated.device)
        for step, logits in enumerate(output.logits):  # one [R, V] per step: never a [R, L, V] tensor
            picked = torch.log_softmax(logits.float(), -1).gather(-1, generated[:, step : step + 1]).squeeze(-1)
            logprob += torch.where(before_eos[:, step], picked, 0.0)
        texts = tokenizer.batch_decode(torch.where(before_eos & ~is_eos, generated, pad), skip_special_tokens=True)
        return texts, logprob


def _logits_at(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The model's float32 logits at the `keep` positions ([R, T] bool) -> [Q, V], row-major.

    The output layer runs only there where the model supports transformers' `logits_to_keep`
    mask (over a large vocabulary it is most of a small model's forward); otherwise it runs on
    every position and the kept ones are gathered.
    """
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
        return logits.reshape(-1, logits.shape[-1]).float()
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[keep].float()


def _on_union(ids: torch.Tensor, aligned: torch.Tensor, tables: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Every selected source's log-probability on the union of the k selected sources' top-K ids.

    ids [B, k, T, K] each source's own top-K; aligned [B, k, T]; tables: per source, the rows and
    slots it ran on, its usable positions and its student-vocabulary log-probs there.
    -> ids and logprobs [B, k, T, k * K]: the union's ids (-1 for a repeat or an empty slot) on
    every slot of an aligned position, each slot's log-probabilities on them.
    """
    batch, k, length, top = ids.shape
    union, _ = ids.permute(0, 2, 1, 3).reshape(batch, length, k * top).sort(-1)  # [B, T, U]
    union[..., 1:] = torch.where(union[..., 1:] == union[..., :-1], -1, union[..., 1:])
    logprobs = torch.full((batch, k, length, k * top), -math.inf, device=ids.device)
    for rows, slots, usable, table in tables:
        at, positions = usable.nonzero(as_tuple=True)  # the order of the table's rows
        b, slot = rows[at], slots[at]
        wanted = union[b, positions]  # [P, U]
        logprobs[b, slot, positions] = table.gather(-1, wanted.clamp(min=0)).masked_fill(wanted < 0, -math.inf)
    union_ids = torch.where(aligned[..., None], union[:, None], -1)
    return union_ids, logprobs.masked_fill(union_ids < 0, -math.inf)


class _SourceView(NamedTuple):
    """One source's view of its rows (`SourcePool._source_view`): the rows in its own tokens
    [R, T_source], and where each student position [R, T] reads it. With the student's tokenizer
    the rows are the student's own and every field from `side` on is None."""

    ids: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor
    trained: torch.Tensor  # [R, T_source] source positions that carry a target
    trained_rows: torch.Tensor  # [Q] the row of each, row-major
    side: object = None  # the aligner's output
    position_map: torch.Tensor | None = None  # [R, T] the source position read, or -1
    inside: torch.Tensor | None = None  # [R, T] positions inside a source token, read from the position before it
    inside_offset: torch.Tensor | None = None  # [R, T] the bytes of that token before the position
    spelled_token: torch.Tensor | None = None  # [R, T] the token the position is inside of
    from_prefix: torch.Tensor | None = None  # [R, T] shared boundaries read from the text before them (`boundary: prefix`)
    ending: torch.Tensor | None = None  # [R, T] the source token that ends at the boundary


class _AlignedReads(NamedTuple):
    """Where the P usable student positions read a source with another tokenizer
    (`SourcePool._aligned_reads`); each index tensor selects some of the P."""

    read: torch.Tensor  # [P] each position's row of the source's log-probabilities
    at: torch.Tensor  # [P'] positions inside a source token
    boundary: torch.Tensor  # the others (empty when no position is inside a token)
    tokens: torch.Tensor | None  # [P'] the token each is inside of
    spelled: torch.Tensor | None  # [P'] its bytes before the position
    mix: torch.Tensor  # [P''] shared boundaries read from the text before them
    ended_token: torch.Tensor | None  # [P''] the token ending there
    mix_read: torch.Tensor | None  # [P''] the row of the position before it
    spans: tuple | None  # `SourcePool._spanning`'s answer


def _source_ce(view: _SourceView, logp: torch.Tensor, slot: torch.Tensor, trained: torch.Tensor, top) -> tuple[torch.Tensor, torch.Tensor]:
    """Which rows the source read with finite logits on every trained position, and its CE on the
    gold response there. `top`: the top-K of `logp` where already taken, or None.
    -> finite [R] and ce [R] (0 where not finite)."""
    broken_at = torch.isnan(top[0][:, 0] if top is not None else logp.amax(-1))  # [Q']
    rows_q = view.trained_rows  # the Q trained source positions, row-major
    at_q = slot[view.trained]  # their rows of `logp`
    broken = torch.zeros(len(trained), device=logp.device).index_add(0, rows_q, broken_at[at_q].float())
    finite = broken == 0  # [R]: usable where it is trained
    gold = logp[at_q, view.targets[view.trained]]  # [Q]
    # CE of the response text in the source's own tokens, per student trained token: the
    # same number as the token-mean CE when the tokenizers agree, comparable when they do not.
    nll = torch.zeros(len(trained), device=logp.device).index_add(0, rows_q, torch.where(finite[rows_q], -gold, 0.0))
    return finite, torch.where(finite, nll / trained.sum(-1).clamp(min=1), 0.0)


def _spread(usable: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-K of the P usable positions laid out over every student position [R, T, K]
    (-1 ids and -inf log-probabilities elsewhere, and for the empty entries of a top-K)."""
    out_ids = torch.full((*usable.shape, top_k), -1, device=top_logprobs.device)
    out_logprobs = torch.full((*usable.shape, top_k), -math.inf, device=top_logprobs.device)
    out_ids[usable], out_logprobs[usable] = torch.where(top_logprobs > -math.inf, top_ids, -1), top_logprobs
    return out_ids, out_logprobs
