"""`FusionDistillModule`: a LoRA student distilled from N frozen sources.

The `fusion` setting picks how the target is built; every baseline of the method is a setting
of this one module, a row of `fusion.objectives.methods.METHODS`:

    none        SFT on the gold tokens only, no source runs
    uniform     all N sources, equal weights
    avgce       all N sources, alpha = softmax(-CE)
    mince       all N sources, the lowest-CE source per sequence (FuseLLM's best)
    confidence  all N sources, alpha = softmax(-CE); a prompt without gold is answered by the
                source most confident in its own answer (the label-free AvgCE, N generations)
    single      one fixed source (`single_source`)
    oracle      the specialist of the example's domain (`oracle`): label routing (MOPD), needs the domain label
    selector    ours: the selector's top-k sources, dynamic weights, feedback loss

The student learns along one response per prompt: the gold answer where the row has one; for an
unlabelled prompt, the answer of the source the method picks (for the selector, its top source),
re-tokenized for the student and distilled exactly as gold is. See `answer_prompts`. With
`response_from: student` (on-policy, GKD) the student samples its own response to every prompt
instead, and the selected sources score each of its tokens. See `training_step`. On-policy
fusion is best run as a second stage (`init_from` an off-policy checkpoint).

Checkpoints hold the LoRA adapter and the selector only; sources and base weights are
rebuilt from their paths.
"""

from __future__ import annotations

import math
import os

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
import torch

from fusion.objectives import fusion_rule, losses
from fusion.objectives.curriculum import DomainCurriculum, sequence_nll
from fusion.sources.cache import CacheWriter, SourceCache, cache_fingerprint, model_fingerprint, row_key, rows_to_records
from fusion.data import IGNORE_INDEX
from fusion.data.datamodule import collate, encode, is_labelled
from fusion.stages.fusion_settings import FusionSettings
from fusion.objectives.methods import Method
from fusion.stages.metrics import EvalMetrics
from fusion.stages.rewards import Rewards
from fusion.objectives.selection import SourceSelector, exploration_scale, fit_selector, noisy_top_k, prompt_features
from fusion.stages.student import StudentStage, pad_right, sample_responses, start_student, stop_if_nonfinite
from fusion.data.tokenizer import load_tokenizer
from fusion.models import resolve_model_path
from fusion.sources.pool import SourcePool, source_name
from fusion.sources.vocab_map import default_cache_dir

FEATURE_MEMORY = 2**30  # bytes of prompt features kept per process (float32: 65k rows at D = 4096)


class FusionDistillModule(StudentStage, L.LightningModule):
    """Distil N frozen sources into a LoRA student.

    Args:
        student: path (or hub name) of the student's base model; its tokenizer is the data's.
        sources: paths (or hub names) of the source models; a source is named by its last path part.
        fusion: how the target is built, one of none, uniform, avgce, mince, confidence, single,
            oracle, selector (`fusion.objectives.methods`).
        top_k: sources run per sequence with `selector` (1 <= top_k <= N).
        single_source: the source name used by `single`.
        oracle: domain -> source name, used by `oracle`.
        lam: weight of the gold CE; 1 - lam weighs the KL to the fused target.
        temperature: distillation temperature T (> 0).
        source_top_k: K, the support kept of each source's distribution per position (the fused
            target lives on the union of the selected sources' top-K, plus a tail bucket).
        unaligned: a student position where a source with another tokenizer has no token
            boundary: the source's distribution over the bytes that follow, read inside its own
            token ("marginal", the default, `fusion.sources.marginal`), a one-hot of the gold token
            ("gold_onehot"), or no distribution from that source ("mask").
        vocab_map: how source tokens map to student tokens: "exact+med" (exact string, else
            minimum edit distance), "exact+prefix" (exact, else the first student token of the
            source token's text) or "exact" (else dropped).
        vocab_map_dir: where vocabulary maps are cached, one file per pair of tokenizers; null
            (default): the per-user cache, `$FUSION_CACHE/vocab_maps` if FUSION_CACHE is set, else
            `$XDG_CACHE_HOME/fusion/vocab_maps`, else `~/.cache/fusion/vocab_maps`
            (`fusion.sources.vocab_map.default_cache_dir`).
        boundary: a student position where a source with another tokenizer has a token boundary
            too: the source's next-token distribution there, which assumes its token ended there
            ("token_end"), or the distribution given the text before the position only
            ("prefix", with `unaligned: marginal`: `fusion.sources.marginal`). Where the student's next
            token is its own sample, "token_end" lets that token choose its target (a wrong token
            can end the source's token early). null: "prefix" with `response_from: student` and
            `unaligned: marginal`, else "token_end".
        gamma: sharpness of the dynamic weights on observed quality (0: selector only).
        tau: temperature of the selection distribution pi = softmax(u / tau).
        feedback_weight: beta, weight of the CV^2 feedback loss (online only: see `explores`).
        selector_loss: "mse" or "huber" regression of u onto -CE, or "likelihood": exp(u) onto the
            probability of the whole response, exp(-CE * its tokens) (`losses.selector_loss`), so
            that a source usually right and sometimes confidently wrong outranks one always unsure.
        initial_quality: the selector's starting prediction for every source.
        selector_prefit_steps: with unlabelled prompts in the corpus, the selector is first fitted
            on the labelled rows (every source's CE observed once) for this many full-batch steps,
            so that it routes the first unlabelled prompt as well as the last.
        exploration_noise, exploration_steps: Gumbel noise scale at step 0, annealed to 0 (online only).
        lora: peft LoraConfig arguments.
        learning_rate, selector_learning_rate, warmup_steps: AdamW with warmup and cosine decay.
        lr_decay_fraction: the cosine decay spans the last fraction of the run; before it the rate
            holds (1.0, the default: the cosine spans the whole run).
        max_new_tokens: greedy decoding budget at evaluation.
        response_max_new_tokens, response_sampling, response_temperature: how a source answers an
            unlabelled prompt: greedy (default) or sampled at this temperature, at most this many
            of its own tokens.
        response_from: what the student learns along: "source" (off-policy: the gold answer, else
            the answer of the source the method picks) or "student" (on-policy: its own sample).
        sample_temperature, sample_max_new_tokens: the student's sampling with `response_from:
            student` (pure sampling at this temperature, at most this many tokens).
        on_policy_fraction: GKD's lambda, the share of steps that are on-policy (the rest are
            off-policy), evenly spread over the steps; with `response_from: student`.
        on_policy_mix: what an on-policy step learns besides the student's samples: "alternate"
            (GKD's batches: only the labelled rows' gold CE) or "joint" (the whole off-policy
            loss along the same prompts' gold or source answers too, as MiniLLM keeps its
            language-modelling term: the samples' divergence is added to an off-policy step).
        divergence: D of the distillation term (`losses.sparse_divergence`): forward_kl,
            reverse_kl or jsd; jsd_beta: the JSD's beta (0 < beta < 1).
        selector_signal: what the selector regresses onto: "gold_ce" (-CE of each selected source
            on the labelled rows' gold) or "rewards" (each selected source answers every prompt and
            `selector_rewards` scores the answer: k generations per prompt).
        selector_rewards: dotted path of a reward function -> weight (`fusion.stages.rewards`), with
            `selector_signal: rewards`; the default reads no gold.
        curriculum_floor, curriculum_momentum: an adaptive curriculum (`fusion.objectives.curriculum`):
            null (default) draws training rows uniformly; a number in (0, 1] draws each row's domain
            in proportion to how far the student trails its sources there (the probability the
            sources give each row's response minus the student's, a moving average with this
            momentum per batch), every domain keeping
            at least this share divided by the number of domains.
        init_from: where the student starts: null (a fresh adapter on `student`), a checkpoint of
            an earlier stage (`.ckpt`: its adapter, and its selector when it has one for the same
            sources, are loaded and trained on; a loaded selector is not fitted again), a model
            directory (`fusion.export`'s output: a fresh adapter on it) or a glob (its newest match).
            On-policy fusion starts best from an off-policy fusion checkpoint: a student whose own
            answers are close enough to the sources' for their scores along them to teach.
        source_mode: "online" runs the selected sources every step; "cached" reads their outputs
            from `cache_dir`, written beforehand by `predict` (see fusion/sources/cache.py).
        cache_dir: the offline cache's directory (written by `predict`, read when cached).
    """

    def __init__(
        self,
        student: str = "checkpoints/zoo/student",
        sources: list[str] = [],
        fusion: str = "selector",
        top_k: int = 2,
        single_source: str | None = None,
        oracle: dict[str, str] | None = None,
        lam: float = 0.9,
        temperature: float = 1.0,
        source_top_k: int = 10,
        unaligned: str = "marginal",
        vocab_map: str = "exact+med",
        vocab_map_dir: str | None = None,
        boundary: str | None = None,
        gamma: float = 1.0,
        tau: float = 1.0,
        feedback_weight: float = 0.1,
        selector_loss: str = "mse",
        selector_hidden: int = 64,
        initial_quality: float = -1.0,
        selector_prefit_steps: int = 500,
        exploration_noise: float = 1.0,
        exploration_steps: int = 100,
        lora: dict = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"},
        learning_rate: float = 3e-3,
        selector_learning_rate: float = 3e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 20,
        lr_decay_fraction: float = 1.0,
        max_new_tokens: int = 24,
        response_max_new_tokens: int = 32,
        response_sampling: bool = False,
        response_temperature: float = 1.0,
        response_from: str = "source",
        sample_temperature: float = 1.0,
        sample_max_new_tokens: int = 32,
        on_policy_fraction: float = 1.0,
        on_policy_mix: str = "alternate",
        divergence: str = "forward_kl",
        jsd_beta: float = 0.5,
        selector_signal: str = "gold_ce",
        selector_rewards: dict[str, float] = {"fusion.stages.rewards.answer_format": 1.0},
        curriculum_floor: float | None = None,
        curriculum_momentum: float = 0.9,
        init_from: str | None = None,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        source_mode: str = "online",
        cache_dir: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.settings = FusionSettings(**{name: self.hparams[name] for name in FusionSettings.names()})
        if trust_remote_code:
            rank_zero_warn("model.trust_remote_code is true: the student's and sources' own Python code will run")
        self.method: Method = self.settings.method
        self.selector_rewards = Rewards(selector_rewards, "model.selector_rewards") if selector_signal == "rewards" else None
        self.tokenizer = load_tokenizer(resolve_model_path(student, "model.student"), trust_remote_code)
        self._pool: SourcePool | None = None  # loaded where sources run (see `pool`)
        for index, path in enumerate(sources):  # a missing source fails here, not at the first step
            resolve_model_path(path, f"model.sources[{index}]")
        self.cache: SourceCache | None = None
        self.source_names = self.settings.source_names
        self.student, self.base_model, self.init_path = start_student(student, init_from, lora, dtype, trust_remote_code, self.tokenizer)
        self.selector = (
            SourceSelector(self.student.config.get_text_config().hidden_size, len(sources), selector_hidden, initial_quality)
            if fusion == "selector"
            else None
        )
        if self.selector is not None and self.init_path is not None and os.path.isfile(self.init_path):
            self._prefitted = self._load_selector(self.init_path)
        self._features: dict[str, torch.Tensor] = {}  # row key -> the base's prompt features (see prompt_features)
        self._feature_bytes = 0
        self.vocab_size = len(self.tokenizer)
        self.max_length = 64  # of a re-encoded answered row; the data module's data.max_length once attached
        self.eval_metrics: EvalMetrics | None = None
        self.curriculum: DomainCurriculum | None = None  # built with the data's domains (`setup`)
        self.strict_loading = False  # checkpoints hold the trainable weights only

    def _load_selector(self, path: str) -> bool:
        """The selector of a fusion checkpoint, if it has one: True when loaded. Its sources must
        be this run's, in the same order (a selector scores sources by position)."""
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state = {k.removeprefix("selector."): v for k, v in checkpoint.get("state_dict", {}).items() if k.startswith("selector.")}
        if not state:
            return False
        trained_for = [source_name(p) for p in checkpoint.get("hyper_parameters", {}).get("sources", [])]
        if trained_for != self.source_names:
            raise ValueError(f"model.init_from: the selector in {path!r} scores the sources {trained_for}, model.sources are "
                             f"{self.source_names}: list the same sources in the same order, or start from a checkpoint without a selector")
        self.selector.load_state_dict(state)
        rank_zero_info(f"model.init_from: the selector of {path!r} routes from the first step (not fitted again)")
        return True

    @property
    def pool(self) -> SourcePool:
        """The sources, loaded on first use: `fit` (online) and `predict` run them; `test`,
        `validate`, `load_from_checkpoint` and `fusion.export` never load one."""
        if self._pool is None:
            if not self.method.uses_sources:
                raise ValueError(f"model.fusion {self.settings.fusion!r} runs no source")
            self._pool = self._load_pool()
        return self._pool

    def _load_pool(self) -> SourcePool:
        h = self.settings
        return SourcePool.load(h.sources, self.tokenizer, h.dtype, h.trust_remote_code, top_k=h.source_top_k,
                               unaligned=h.unaligned, vocab_map=h.vocab_map, vocab_map_dir=h.vocab_map_dir or default_cache_dir(),
                               boundary=h.resolved_boundary)

    @property
    def explores(self) -> bool:
        """Whether selection explores (Gumbel noise, feedback loss): in training, while the selector
        has observed only the sources it selected. With the cache it observes every source on
        every labelled row, and after `prefit_selector` it has observed each once: there is
        nothing to explore, and balancing would only bias its estimates (`python -m fusion.bench
        selector` measures by how much)."""
        return self.training and self.cache is None and not getattr(self, "_prefitted", False)

    @property
    def learns_from_unlabeled(self) -> bool:
        """Whether the training loader should hand this module prompts without gold (read by the data module)."""
        return self.method.learns_from_unlabeled

    # ---------------------------------------------------------------- the offline cache

    def cache_fingerprint(self, data=None) -> dict:
        """What a cache for this run depends on: sources, tokenizers, the fusion corpus, K, T and,
        with unlabelled prompts, how they are answered."""
        h, data = self.settings, data or self.trainer.datamodule
        paths = {name: resolve_model_path(path, f"model.sources[{i}]") for i, (name, path) in enumerate(zip(self.source_names, h.sources))}
        tokenizers = {name: load_tokenizer(path, h.trust_remote_code) for name, path in paths.items()}
        settings = h.source_output_settings() | {"max_length": data.hparams.max_length}
        if data.hparams.get("chat_template"):  # the sources read the rendered prompts
            settings["chat_template"] = data.chat.template
        if data.load()["unlabeled"]:
            settings["answers"] = h.answer_settings()
            if self.method.runs == "top_k":  # the selector routes from the base student's features
                settings["answers"]["student weights"] = model_fingerprint(resolve_model_path(h.student, "model.student"))
        return cache_fingerprint(paths, self.tokenizer, tokenizers, data.corpus(), settings)

    def attach_cache(self, data=None) -> None:
        """Read the offline cache of `cache_dir`, after checking it was computed for this run."""
        self.cache = SourceCache(self.settings.cache_dir, self.cache_fingerprint(data), len(self.source_names))

    def configure_callbacks(self):
        if self.settings.cache_dir and self.method.uses_sources:
            return [CacheWriter(self.settings.cache_dir, self.vocab_size)]  # acts in `predict` only
        return []

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        """Every source on every labelled row of the fusion corpus; then each unlabelled prompt
        answered as the method answers it, with the sources that run along that answer."""
        if dataloader_idx == 0 and all(batch["labelled"].tolist()):
            selected = torch.arange(len(self.source_names), device=self.device).expand(batch["input_ids"].shape[0], -1)
        else:
            batch = self.answer_prompts(batch)
            selected = batch["answer_sources"]
        return rows_to_records(batch, self.pool.to(self.device).run(selected, batch, self.settings.temperature), selected)

    # ---------------------------------------------------------------- what the selector reads

    @torch.no_grad()
    def prompt_features(self, batch: dict) -> torch.Tensor:
        """The selector's input: the frozen base student's last hidden states, averaged over the
        prompt tokens. [B, D]

        The base (the adapter disabled), not the student being trained: its features do not move
        while the adapter learns, so what the selector learned on the labelled rows stays valid
        for every later prompt. (With the trained student's own features, an online selector that
        observes only what it selects lost track of every source it had stopped selecting, and
        routed unlabelled prompts to a distractor.) Causal attention: the prompt positions of the
        right-padded sequences are the prompt's alone, so only those are run. Since they never
        change, each row's features are computed once and kept (up to FEATURE_MEMORY bytes; rows
        beyond are recomputed when they come back).
        """
        keys = [row_key(row) for row in batch["rows"]] if "rows" in batch else [None] * len(batch["input_ids"])
        missing = [b for b, key in enumerate(keys) if key is None or key not in self._features]
        if missing:
            rows = torch.tensor(missing, device=batch["input_ids"].device)
            prompt_mask = batch["prompt_mask"][rows]
            width = int(prompt_mask.sum(-1).max())
            with self.student.disable_adapter():
                hidden = self.student(input_ids=batch["input_ids"][rows, :width], attention_mask=batch["attention_mask"][rows, :width],
                                      output_hidden_states=True).hidden_states[-1]
            computed = prompt_features(hidden, prompt_mask[:, :width]).float()
            if None in keys or self._feature_bytes + computed.numel() * 4 > FEATURE_MEMORY:
                fresh = dict(zip(missing, computed))
                return torch.stack([fresh[b] if b in fresh else self._features[key].to(computed.device) for b, key in enumerate(keys)])
            for b, features in zip(missing, computed.cpu()):
                self._features[keys[b]] = features
            self._feature_bytes += computed.numel() * 4
        return torch.stack([self._features[key] for key in keys]).to(batch["input_ids"].device)

    # ---------------------------------------------------------------- answers to prompts without gold

    def answer_prompts(self, batch: dict) -> dict:
        """Give every unlabelled row of the batch the answer of the source the method picks.

        Online, the sources that will run along the answer are chosen first (the selector: its
        top-k from the prompt alone, without exploration noise, since nothing is observed on an
        unlabelled row), then the writer answers in its own tokens (`SourcePool.answer`): the
        first of the selected, a source drawn by a hash of the prompt (`uniform`), or every
        source, keeping the answer with the highest log-probability per student token
        (`confidence`). Cached, the answer and its sources are read from the cache.

        Returns the batch re-encoded in student tokens along the answers (labelled rows along
        their gold), with `answers` (per row: None, or text, writer, generations) and
        `answer_sources` [B, k] (-1 on labelled rows). An empty answer gives its row no
        trained position (logged as `train/empty_answers`).
        """
        rows = batch["rows"]
        todo = [b for b, row in enumerate(rows) if not is_labelled(row)]
        if not todo:
            return batch
        if self.cache is not None:
            answers = [self.cache.answer(rows[b]) for b in todo]
        else:
            answers = self._write_answers(batch, todo)
        k = len(answers[0]["sources"])
        answer_sources = torch.full((len(rows), k), -1, dtype=torch.long)
        per_row: list[dict | None] = [None] * len(rows)
        for b, answer in zip(todo, answers):
            answer_sources[b] = torch.tensor(answer["sources"])
            per_row[b] = answer
        features = []
        for row, answer in zip(rows, per_row):
            response = row["response"] if answer is None else (answer["text"] or None)
            features.append(encode(self.tokenizer, row["prompt"], response, self.max_length) | {"row": row})
        device = batch["input_ids"].device
        answered = {key: value.to(device) if torch.is_tensor(value) else value
                    for key, value in collate(features, self.tokenizer.pad_token_id).items()}
        answered["answers"], answered["answer_sources"] = per_row, answer_sources.to(device)
        return answered

    @torch.no_grad()
    def _write_answers(self, batch: dict, todo: list[int]) -> list[dict]:
        """Online: who runs along each unlabelled row, who writes its answer, and the answer."""
        h, rows, n = self.settings, batch["rows"], len(self.source_names)
        device = batch["input_ids"].device
        if self.method.runs == "top_k":
            subset = {key: batch[key][todo] for key in ("input_ids", "attention_mask", "prompt_mask")}
            sources = noisy_top_k(self.selector(self.prompt_features(subset)), h.top_k).tolist()
        else:
            index = torch.tensor(todo, device=device)
            subset = {"input_ids": batch["input_ids"][index], "rows": [rows[b] for b in todo]}
            sources = self._select_by_rule(subset).tolist()
        prompts = [rows[b]["prompt"] for b in todo]
        pool = self.pool.to(self.device)
        if self.method.answers == "most_confident":
            writers = [list(range(n)) for _ in todo]
        elif self.method.answers == "random":
            writers = [[int(row_key(rows[b]), 16) % n] for b in todo]
        else:
            writers = [[chosen[0]] for chosen in sources]
        texts: dict[tuple[int, int], tuple[str, float]] = {}  # (row, source) -> (answer, log-prob per student token)
        for source in sorted({s for w in writers for s in w}):
            mine = [i for i, w in enumerate(writers) if source in w]
            written, logprob = pool.answer(source, [prompts[i] for i in mine], h.response_max_new_tokens, h.response_sampling, h.response_temperature)
            for i, text, value in zip(mine, written, logprob.tolist()):
                text = text.strip()  # an answer is trained on as gold is: without surrounding white space
                tokens = len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # + eos
                texts[(i, source)] = (text, value / tokens)
        answers = []
        for i, chosen in enumerate(sources):
            # The writer: the only one, or the most confident among those with a non-empty answer.
            writer = max(writers[i], key=lambda s: (bool(texts[(i, s)][0]), texts[(i, s)][1]))
            answers.append({"text": texts[(i, writer)][0], "writer": writer, "generations": len(writers[i]), "sources": chosen})
        return answers

    # ---------------------------------------------------------------- the fusion step

    def _select_by_rule(self, batch: dict) -> torch.Tensor:
        """The sources of every method but the selector's. -> [B, k] source indices"""
        h, batch_size, n = self.settings, batch["input_ids"].shape[0], len(self.source_names)
        device = batch["input_ids"].device
        if self.method.runs == "single":
            return torch.full((batch_size, 1), self.source_names.index(h.single_source), device=device)
        if self.method.runs == "domain":
            h.check_oracle_domains({row["domain"] for row in batch["rows"]})
            index = [self.source_names.index(h.oracle[row["domain"]]) for row in batch["rows"]]
            return torch.tensor(index, device=device).unsqueeze(1)
        return torch.arange(n, device=device).expand(batch_size, n)  # uniform, avgce, mince, confidence

    def select(self, batch: dict, quality: torch.Tensor | None) -> torch.Tensor:
        """The sources each sequence runs. -> [B, k] source indices

        An answered prompt runs the sources chosen when its answer was written (`answer_sources`).
        """
        h = self.settings
        if self.method.runs == "top_k":
            noise = exploration_scale(self.global_step, h.exploration_noise, h.exploration_steps) if self.explores else 0.0
            selected = noisy_top_k(quality, h.top_k, noise)
        else:
            selected = self._select_by_rule(batch)
        fixed = batch.get("answer_sources")
        if fixed is not None:
            selected = torch.where(fixed[:, :1] >= 0, fixed.to(selected.device), selected)
        return selected

    def weights(self, selected_quality: torch.Tensor | None, ce: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """alpha over the selected sources, 0 on a skipped one (`fusion_rule.fusion_weights`). [B, k] x3 -> [B, k]"""
        h = self.settings
        return fusion_rule.fusion_weights(self.method.weights, selected_quality, ce, valid, h.tau, h.gamma)

    def on_policy(self, step: int) -> bool:
        """Whether step `step` learns along the student's own samples: with `response_from:
        student`, a share `on_policy_fraction` of the steps (GKD's lambda), evenly spread: step s
        is on-policy when floor((s + 1) f) > floor(s f). No random draw: a resumed run decides as
        the uninterrupted one did."""
        h = self.settings
        f = h.on_policy_fraction
        return h.response_from == "student" and math.floor((step + 1) * f) > math.floor(step * f)

    def sample(self, batch: dict) -> dict:
        """The student's response to every prompt of the batch, sampled in one `generate` call,
        without gradient; -> input_ids, attention_mask, targets [B, W] in student tokens (trained
        on the sampled tokens up to the first eos), completion, length [B] (`pack_rollouts`)."""
        h = self.settings
        return sample_responses(self.student, self.tokenizer, batch["prompt_ids"], batch["prompt_attention_mask"],
                                h.sample_temperature, h.sample_max_new_tokens)

    def _scored_rows(self, batch: dict, samples: dict, kept: torch.Tensor) -> dict:
        """The B samples, then the `kept` rows of the batch along their gold or source answer,
        right-padded to one width ([B + kept, W]): what the sources run on and the student reads
        in an on-policy step."""
        width = max(samples["input_ids"].shape[1], batch["input_ids"].shape[1])
        pad = {"input_ids": self.tokenizer.pad_token_id, "attention_mask": 0, "targets": IGNORE_INDEX}
        return {key: torch.cat([pad_right(samples[key], width, value), pad_right(batch[key][kept], width, value)]) for key, value in pad.items()}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Off-policy: lam * CE + (1 - lam) * T^2 * D(P_F || student) along the gold answer, or
        for a prompt without gold the answer of the source the method picks (`answer_prompts`).

        On-policy (`on_policy`): the student samples a response to every prompt, labelled or not
        (`sample`); the selected sources score each sampled token (their distributions aligned
        onto the student's positions by `SourcePool.run`, whatever their tokenizer), and the loss
        is lam * CE on the labelled rows' gold (token mean) + (1 - lam) * T^2 * D(P_F, student)
        at every sampled position (token mean). The sources also run along the labelled rows'
        gold, in the same call, so the selector observes gold CE as in an off-policy step. With
        `on_policy_mix: joint` they run along every row's gold or source answer, and the loss is
        the off-policy step's along those plus (1 - lam) * T^2 * D at the sampled positions.
        """
        h = self.settings
        on_policy = self.on_policy(self.global_step)
        joint = on_policy and h.on_policy_mix == "joint"
        batch = batch if on_policy and not joint else self.answer_prompts(batch)
        targets = batch["targets"]
        if not self.method.uses_sources:
            logits = self.logits(batch["input_ids"], batch["attention_mask"])
            terms = losses.student_loss(logits, targets, None)
            stop_if_nonfinite(self, terms["loss"], terms)
            if self.curriculum is not None:  # no source: the gap is the student's own NLL along gold
                self._update_curriculum(batch, logits, torch.zeros(len(targets), device=self.device))
            self.log_dict({"train/loss": terms["loss"], "train/ce": terms["ce"]}, prog_bar=True)
            return terms["loss"]

        quality = None
        if self.selector is not None:
            quality = self.selector(self.prompt_features(batch))  # [B, N]
        selected = self.select(batch, quality)  # [B, k]
        size, labelled = selected.shape[0], batch["labelled"].to(self.device)
        logs = {"train/on_policy": float(on_policy)}
        if on_policy:
            samples = self.sample(batch)
            kept = torch.ones_like(labelled) if joint else labelled  # the rows also read along gold or an answer
            scored = self._scored_rows(batch, samples, kept)
            run = torch.cat([selected, selected[kept]])
            logs |= {"train/sampled_tokens": samples["length"].sum().float(), "train/sample_length": samples["length"].float().mean()}
        else:
            scored, run = batch, selected
        if self.cache is not None:  # every source's CE on a labelled row is known: the selector observes all N
            out, all_ce, all_valid = self.cache.lookup(batch, selected)
        else:
            out = self.pool.to(self.device).run(run, scored, h.temperature, union=True)  # the exact mixture on the union
            self.log_dict({f"align/{name}": value for name, value in self.pool.coverage.items()})  # positions with the source's distribution
            gold_ce, gold_valid = out.ce, out.valid
            if on_policy:  # the rows along gold or answers come after the samples
                gold_ce, gold_valid = torch.zeros_like(out.ce[:size]), torch.zeros_like(out.valid[:size])
                gold_ce[kept], gold_valid[kept] = out.ce[size:], out.valid[size:]
            all_ce = torch.zeros(size, len(self.source_names), device=self.device).scatter(1, selected, gold_ce)
            all_valid = torch.zeros_like(all_ce, dtype=torch.bool).scatter(1, selected, gold_valid)
            all_valid &= labelled[:, None]  # CE along a source's answer or the student's sample is no quality signal
        if self.selector_rewards is not None:
            all_ce, all_valid, reward_logs = self._reward_observations(batch, selected)
            logs |= reward_logs
        # Joint: each prompt's weights come from its sources' CE along its gold or answer, not its sample.
        ce, valid = (out.ce[size:], out.valid[size:]) if joint else (out.ce[:size], out.valid[:size])
        selected_quality = quality.gather(1, selected) if quality is not None else None
        # A source with non-finite logits on a sequence is skipped there: weight 0, not observed.
        # A sequence left with no usable source gets no target, so no KL, only gold CE.
        alpha = self.weights(selected_quality, ce, valid)  # [B, k]
        rows = 2 * size if joint else size  # the rows with a fused target: the samples, and joint's answers
        fused = fusion_rule.fused_target(out.ids[:rows], out.logprobs[:rows], alpha.repeat(rows // size, 1), out.aligned[:rows])
        # The student runs after the sources: their [positions, V] buffers are freed by now, so
        # the step's peak memory is the student's, as in plain SFT.
        logits = self.logits(scored["input_ids"], scored["attention_mask"])
        terms = self._student_terms(logits, scored["targets"], fused, size if on_policy else None, joint)
        if self.curriculum is not None and not on_policy:  # the sources' NLL along each row's answer: their weighted CE
            self._update_curriculum(batch, logits, (alpha * torch.where(valid, ce, 0.0)).sum(-1))
        total = terms["loss"]
        logs |= {"train/loss_student": terms["loss"], "train/ce": terms["ce"], "train/divergence": terms["divergence"],
                 "train/alpha_max": alpha.max(-1).values.mean()}
        # The dynamic weights' mean per source over the batch (0 where a source was not run).
        mean_weight = torch.zeros(alpha.shape[0], len(self.source_names), device=alpha.device).scatter(1, selected, alpha).mean(0)
        logs |= {f"weight/{name}": mean_weight[i] for i, name in enumerate(self.source_names)}
        logs["train/source_skipped"] = (~valid).sum().float()
        self.log("faults/source_skipped", logs["train/source_skipped"], reduce_fx="sum", on_step=False, on_epoch=True, sync_dist=True)
        answers = [a for a in batch.get("answers") or [] if a is not None]
        if answers:
            logs |= {"train/answered": float(len(answers)), "train/empty_answers": float(sum(not a["text"] for a in answers)),
                     "train/generations": float(sum(a["generations"] for a in answers)) if self.cache is None else 0.0}
        if quality is not None:
            pi = torch.softmax(quality / h.tau, dim=-1)  # [B, N]
            all_ce = self._quality_observation(all_ce, batch)
            selector_term = losses.selector_loss(quality, all_ce, all_valid, h.selector_loss)
            # Balance the selection where it decides what is observed: on the labelled rows (every row with rewards).
            balanced = labelled if self.selector_rewards is None else torch.ones_like(labelled)
            feedback_term = losses.feedback_loss(pi[balanced]) if balanced.any() else pi.sum() * 0.0
            total = total + selector_term + (h.feedback_weight * feedback_term if self.explores else 0.0)
            share = torch.zeros_like(quality).scatter(1, selected, valid.float()).mean(0)
            logs |= {"train/loss_selector": selector_term, "train/loss_feedback": feedback_term,
                     "train/selection_entropy": losses.entropy(share / share.sum()),
                     "train/pi_entropy": losses.entropy(pi).mean()}
            logs |= {f"select/{name}": share[i] for i, name in enumerate(self.source_names)}
            # The selector's signed error u_i - q_i (q = -CE or the reward) on observed pairs: > 0 where it overrates a source.
            residual = torch.where(all_valid, quality.detach() + all_ce, 0.0).sum(0) / all_valid.sum(0).clamp(min=1)
            logs |= {f"bias/{name}": residual[i] for i, name in enumerate(self.source_names) if all_valid[:, i].any()}
        logs["train/loss"] = total
        stop_if_nonfinite(self, total, terms)
        self.log_dict(logs, prog_bar=False)
        self.log("loss", total, prog_bar=True, logger=False)
        return total

    def _student_terms(self, logits: torch.Tensor, targets: torch.Tensor, fused: fusion_rule.SparseTarget,
                       samples: int | None, joint: bool = False) -> dict:
        """loss = lam * CE + (1 - lam) * T^2 * D, with "ce" and "divergence" detached for logging.

        Off-policy (`samples` None): both terms over every trained position (forward KL with
        `student_loss`'s closed-form gradient). On-policy: D over the first `samples` rows (the
        student's samples), CE over the rest (the labelled rows' gold), each a token mean. Joint:
        the off-policy loss over the rest (gold or source answers, with their targets) plus
        (1 - lam) * T^2 * D over the samples ("divergence" logs the samples').
        """
        h = self.settings
        if joint:
            rest = self._student_terms(logits[samples:], targets[samples:], fusion_rule.SparseTarget(*(t[samples:] for t in fused)), None)
            sampled = fusion_rule.SparseTarget(*(t[:samples] for t in fused))
            divergence = losses.divergence_loss(logits[:samples], targets[:samples], sampled, h.divergence, h.jsd_beta, h.temperature)
            return {"loss": rest["loss"] + (1.0 - h.lam) * divergence, "ce": rest["ce"], "divergence": divergence.detach()}
        if samples is None and h.divergence == "forward_kl":
            terms = losses.student_loss(logits, targets, fused, h.lam, h.temperature)
            return {"loss": terms["loss"], "ce": terms["ce"], "divergence": terms["kl"]}
        gold, end = (samples, samples) if samples is not None else (0, len(targets))
        ce = losses.student_loss(logits[gold:], targets[gold:], None)["loss"]
        divergence = losses.divergence_loss(logits[:end], targets[:end], fused, h.divergence, h.jsd_beta, h.temperature)
        return {"loss": h.lam * ce + (1.0 - h.lam) * divergence, "ce": ce.detach(), "divergence": divergence.detach()}

    def _update_curriculum(self, batch: dict, logits: torch.Tensor, source_ce: torch.Tensor) -> None:
        """The curriculum's gap per row, from the student's sequence NLL along its response and the
        sources' (their per-token CE [B] times the row's trained tokens); logs the domains' weights."""
        targets = batch["targets"]
        tokens = (targets != IGNORE_INDEX).sum(-1)
        self.curriculum.update([row["domain"] for row in batch["rows"]], sequence_nll(logits.detach(), targets), source_ce * tokens)
        self.log_dict({f"curriculum/{d}": float(w) for d, w in zip(self.curriculum.domains, self.curriculum.weights())})

    @torch.no_grad()
    def _reward_observations(self, batch: dict, selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """The selector's reward signal: each selected source answers each prompt of the batch (one
        `SourcePool.answer` call per source; an answer already written this step is reused) and
        `selector_rewards` scores the answers. -> (-reward [B, N], observed [B, N]: exactly the
        selected pairs, logs). The reward functions get the rows' columns: on a prompt without
        gold, `response` and `metadata` are None."""
        h, rows = self.settings, batch["rows"]
        texts = {(b, a["writer"]): a["text"] for b, a in enumerate(batch.get("answers") or []) if a is not None}
        written = 0
        for source in selected.unique().tolist():
            todo = [b for b in (selected == source).any(-1).nonzero(as_tuple=True)[0].tolist() if (b, source) not in texts]
            if todo:
                answers, _ = self.pool.to(self.device).answer(source, [rows[b]["prompt"] for b in todo], h.response_max_new_tokens,
                                                              h.response_sampling, h.response_temperature)
                texts |= {(b, source): text.strip() for b, text in zip(todo, answers)}
                written += len(todo)
        pairs = [(b, source) for b, chosen in enumerate(selected.tolist()) for source in chosen]
        scored = [rows[b] for b, _ in pairs]
        columns = {key: [row.get(key) for row in scored] for key in scored[0] if key != "prompt"}
        rewards, means = self.selector_rewards([row["prompt"] for row in scored], [texts[pair] for pair in pairs], columns)
        cost = torch.zeros(len(rows), len(self.source_names), device=self.device).scatter(1, selected, -rewards.to(self.device).view(selected.shape))
        observed = torch.zeros_like(cost, dtype=torch.bool).scatter(1, selected, True)
        return cost, observed, {"train/reward_generations": float(written), **{f"reward/{path}": value for path, value in means.items()}}

    # ---------------------------------------------------------------- the selector before the first step

    @torch.no_grad()
    def _labelled_observations(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompt features [R, D] and every source's CE and validity [R, N] on the labelled train
        rows; with `selector_signal: rewards`, every source's -reward on its own answer instead
        (N generations per labelled row, once)."""
        features, ce, observed = [], [], []
        n = len(self.source_names)
        for batch in self.trainer.datamodule.labelled_loader():
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            features.append(self.prompt_features(batch))
            every = torch.arange(n, device=self.device).expand(batch["input_ids"].shape[0], n)
            if self.selector_rewards is not None:
                batch_ce, batch_observed, _ = self._reward_observations(batch, every)
            elif self.cache is not None:
                _, batch_ce, batch_observed = self.cache.lookup(batch, every)
            else:
                out = self.pool.to(self.device).run(every, batch, self.settings.temperature)
                batch_ce, batch_observed = out.ce, out.valid
            ce.append(self._quality_observation(batch_ce, batch))
            observed.append(batch_observed)
        return torch.cat(features), torch.cat(ce), torch.cat(observed)

    def _quality_observation(self, ce: torch.Tensor, batch: dict) -> torch.Tensor:
        """What the selector regresses onto [B, N]: each source's per-token CE along the rows'
        responses; with `selector_loss: likelihood`, their sequence NLL (CE times the response's
        trained tokens), whose exp is the probability of the whole response, as exact match needs."""
        if self.settings.selector_loss != "likelihood" or self.selector_rewards is not None:
            return ce
        return ce * (batch["targets"] != IGNORE_INDEX).sum(-1, keepdim=True).to(ce.dtype)

    def prefit_selector(self) -> None:
        """Fit the selector on the labelled rows, where every source's quality is observed once,
        before it routes the first prompt that has no gold (N source forwards per labelled row,
        once; read from the cache when there is one)."""
        h = self.settings
        if self.selector is None or h.selector_prefit_steps == 0 or getattr(self, "_prefitted", False):
            return
        features, ce, observed = self._labelled_observations()
        # `predict` runs under inference mode; the fit needs autograd, on tensors made outside it.
        with torch.inference_mode(False), torch.enable_grad():
            features, ce, observed = features.clone(), ce.clone(), observed.clone()
            result = fit_selector(self.selector, features, ce, observed, h.selector_prefit_steps, h.selector_learning_rate, h.selector_loss)
        self._prefitted = True
        rank_zero_info(f"selector: fitted on {len(features)} labelled rows before routing unlabelled prompts: {result['steps']} steps "
                       f"(held-out regression loss {result['held_out_loss']:.3f}), top-1 agreement with the lowest CE "
                       f"{result['top1_agreement']:.2f}")

    # ---------------------------------------------------------------- evaluation (hooks: StudentStage)

    def run_record(self) -> dict:
        return {"fusion": self.settings.fusion}

    def setup(self, stage: str) -> None:
        h = self.settings
        data = self.trainer.datamodule if self.trainer else None
        if data is not None:
            self.max_length = data.hparams.max_length
        unlabelled = data.load()["unlabeled"] if data is not None and stage in ("fit", "predict") else []
        if unlabelled and self.method.uses_sources:
            self.settings.check_unlabelled(unlabelled)
        if stage == "predict":
            if not self.method.uses_sources or not h.cache_dir:
                raise ValueError("predict writes the offline cache: set model.cache_dir and a fusion method with sources")
            self.pool  # noqa: B018 (load now: a source that cannot be used fails before the first row)
        if stage == "fit" and self.method.uses_sources:
            if h.source_mode == "cached" and self.cache is None:
                self.attach_cache()
            elif h.source_mode == "online":
                self.pool  # noqa: B018 (load before the first step)
        if stage == "fit" and h.curriculum_floor is not None and data is not None:
            self.curriculum = DomainCurriculum(data.domain_names, h.curriculum_floor, h.curriculum_momentum)
        self.setup_eval_metrics(self.source_names if self.selector is not None else [])

    def on_fit_start(self) -> None:
        if self.trainer.datamodule.load()["unlabeled"] or self.settings.response_from == "student":
            if self.trainer.ckpt_path is None:
                self.prefit_selector()
            elif self.selector is not None and self.settings.selector_prefit_steps > 0:
                self._prefitted = True  # a resumed run restored the selector that was fitted at its start

    def on_predict_start(self) -> None:
        if self.trainer.datamodule.load()["unlabeled"] and self.method.runs == "top_k":
            self.prefit_selector()

    def evaluation_selection(self, batch: dict) -> torch.Tensor | None:
        """Which sources the trained selector would run for these prompts (None without a selector)."""
        if self.selector is None:
            return None
        return noisy_top_k(self.selector(self.prompt_features(batch)), self.settings.top_k)

    # ---------------------------------------------------------------- optimization (StudentStage's)

    def parameter_groups(self) -> list[dict]:
        """The adapter's group, and the selector's at its own rate and without weight decay."""
        groups = super().parameter_groups()
        if self.selector is not None:
            groups.append({"params": list(self.selector.parameters()), "lr": self.settings.selector_learning_rate, "weight_decay": 0.0})
        return groups
