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
unlabeled prompt, the answer of the source the method picks (for the selector, its top source),
re-tokenized for the student and distilled exactly as gold is. See `answer_prompts`. With
`response_from: student` (on-policy, GKD) the student samples its own response to every prompt
instead, and the selected sources score each of its tokens. See `training_step`. On-policy
fusion is best run as a second stage (`init_from` an off-policy checkpoint).

This module wires the parts together and holds the Lightning hooks; each part lives in its own
module:

    fusion_settings   the settings and their checks (`FusionSettings`)
    routing           which sources run: the selector, its prompt features, its prefit, the rules
    answers           answers for the prompts without gold
    on_policy         which steps sample from the student, and the rows a step reads
    student           what the fusion and SRFT stages share: evaluation, optimizer, checkpoints
    fusion.objectives the formulas: the fused target (`fusion_rule`), the losses (`losses`)
    fusion.sources    the sources online (`pool`) or from the offline cache (`cache`)

Checkpoints hold the LoRA adapter and the selector only; sources and base weights are
rebuilt from their paths.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from fusion.data import IGNORE_INDEX
from fusion.data.datamodule import is_labelled
from fusion.data.tokenizer import load_tokenizer
from fusion.models import named_load, resolve_model_path
from fusion.objectives import losses
from fusion.objectives.curriculum import DomainCurriculum, sequence_nll
from fusion.objectives.selection import SourceSelector, noisy_top_k
from fusion.sources.cache import CacheWriter, SourceCache, cache_fingerprint, model_fingerprint, rows_to_records
from fusion.sources.pool import SourceOutputs, SourcePool
from fusion.stages.answers import along_answers, write_answers
from fusion.stages.fusion_settings import FusionSettings
from fusion.stages.on_policy import StepRows, is_on_policy_step
from fusion.stages.rewards import Rewards
from fusion.stages.routing import PromptFeatures, Router, reward_observations
from fusion.stages.student import StudentStage, sample_responses, start_student, stop_if_nonfinite


class FusionDistillModule(StudentStage, L.LightningModule):
    """Distil N frozen sources into a LoRA student.

    Args:
        student: path (or hub name) of the student's base model; its tokenizer is the data's.
        sources: paths (or hub names) of the source models; a source is named by its last path part.
        fusion: how the target is built, one of none, uniform, avgce, mince, confidence, single,
            oracle, selector (`fusion.objectives.methods`).
        top_k: sources run per sequence with `selector` (1 <= top_k <= N).
        selection_margin: with `selector`, a k that adapts per prompt: of the top-k, only the
            sources whose predicted quality u is within this margin of the top source's are
            weighed (the others get weight 0 in the target and take no part in a fused answer).
            With `selector_loss: likelihood`, u is a log-probability of the whole response, so
            the margin is in nats: a source that knows nothing of the prompt's domain trails by
            tens. null (default): every one of the top-k.
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
        selector_prefit_steps: with unlabeled prompts in the corpus, the selector is first fitted
            on the labelled rows (every source's CE observed once) for this many full-batch steps,
            so that it routes the first unlabeled prompt as well as the last.
        exploration_noise, exploration_steps: Gumbel noise scale at step 0, annealed to 0 (online only).
        lora: peft LoraConfig arguments.
        learning_rate, selector_learning_rate, warmup_steps: AdamW with warmup and cosine decay.
        lr_decay_fraction: the cosine decay spans the last fraction of the run; before it the rate
            holds (1.0, the default: the cosine spans the whole run).
        lora_b_lr_ratio: the adapter's B matrices learn at this multiple of `learning_rate`, its A
            matrices at `learning_rate` (LoRA+, Hayou et al. 2024: B starts at zero and, with one
            rate for both, moves too slowly for the product BA to learn at its best pace).
        max_new_tokens: greedy decoding budget at evaluation.
        response_max_new_tokens, response_sampling, response_temperature: how a source answers an
            unlabeled prompt: greedy (default) or sampled at this temperature, at most this many
            of its own tokens.
        response_from: what the student learns along: "source" (off-policy: the gold answer, else
            the answer of the source the method picks) or "student" (on-policy: its own sample).
        answer_from: with `selector`, who writes the answer to a prompt without gold: "top" (the
            selector's top source, in its own tokens: one generation) or "fused" (the weighed
            sources of the top-k decoding together, greedily, from their mixture with equal
            weights, read across tokenizers from the text so far: `fusion.sources.fused_decoding`;
            one forward of each such source per answer token, without a key-value cache).
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
        selection_margin: float | None = None,
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
        lora_b_lr_ratio: float = 1.0,
        max_new_tokens: int = 24,
        response_max_new_tokens: int = 32,
        response_sampling: bool = False,
        response_temperature: float = 1.0,
        response_from: str = "source",
        answer_from: str = "top",
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
        self.settings = s = FusionSettings(**{name: self.hparams[name] for name in FusionSettings.names()})
        if trust_remote_code:
            rank_zero_warn("model.trust_remote_code is true: the student's and sources' own Python code will run")
        self.selector_rewards = Rewards(selector_rewards, "model.selector_rewards") if selector_signal == "rewards" else None
        with named_load("model.student", student):
            self.tokenizer = load_tokenizer(resolve_model_path(student, "model.student"), trust_remote_code)
        for index, path in enumerate(sources):  # a missing source fails here, not at the first step
            resolve_model_path(path, f"model.sources[{index}]")
        self.student, self.base_model, self.init_path = start_student(student, init_from, lora, dtype, trust_remote_code, self.tokenizer)
        self.vocab_size = len(self.tokenizer)
        self.selector = (
            SourceSelector(self.student.config.get_text_config().hidden_size, len(sources), selector_hidden, initial_quality)
            if fusion == "selector"
            else None
        )
        self.router = Router(s, self.selector, PromptFeatures(self.student))
        if self.selector is not None and self.init_path is not None:
            self.router.load(self.init_path)
        self._pool: SourcePool | None = None  # loaded where sources run (see `pool`)
        self.cache: SourceCache | None = None  # the offline cache, attached in `setup` with source_mode cached
        self.max_length = 64  # of a re-encoded answered row; the data module's data.max_length once attached
        self.curriculum: DomainCurriculum | None = None  # built with the data's domains (`setup`)
        self.eval_metrics = None  # built in `setup`, with the data's domains
        self.strict_loading = False  # checkpoints hold the trainable weights only

    @property
    def learns_from_unlabeled(self) -> bool:
        """Whether the training loader should hand this module prompts without gold (read by the data module)."""
        return self.settings.method.learns_from_unlabeled

    @property
    def explores(self) -> bool:
        """Whether selection explores (Gumbel noise, feedback loss): in training, while the selector
        has observed only the sources it selected. With the cache it observes every source on
        every labelled row, and after `prefit_selector` it has observed each once: there is
        nothing to explore, and balancing would only bias its estimates (`python -m fusion.bench
        selector` measures by how much)."""
        return self.training and self.cache is None and not self.router.prefitted

    # ---------------------------------------------------------------- the sources: online or cached

    @property
    def pool(self) -> SourcePool:
        """The sources, loaded on first use: `fit` (online) and `predict` run them; `test`,
        `validate`, `load_from_checkpoint` and `fusion.export` never load one."""
        if self._pool is None:
            s = self.settings
            if not s.method.uses_sources:
                raise ValueError(f"model.fusion {s.fusion!r} runs no source")
            self._pool = SourcePool.load(s.sources, self.tokenizer, **s.pool_settings())
        return self._pool

    def cache_fingerprint(self, data=None) -> dict:
        """What a cache for this run depends on: sources, tokenizers, the fusion corpus, K, T and,
        with unlabeled prompts, how they are answered."""
        s, data = self.settings, data or self.trainer.datamodule
        paths = {name: resolve_model_path(path, f"model.sources[{i}]") for i, (name, path) in enumerate(zip(s.source_names, s.sources))}
        tokenizers = {name: load_tokenizer(path, s.trust_remote_code) for name, path in paths.items()}
        settings = s.source_output_settings() | {"max_length": data.hparams.max_length}
        if data.hparams.get("chat_template"):  # the sources read the rendered prompts
            settings["chat_template"] = data.chat.template
        if data.load()["unlabeled"]:
            settings["answers"] = s.answer_settings()
            if s.method.runs == "top_k":  # the selector routes from the base student's features
                settings["answers"]["student weights"] = model_fingerprint(resolve_model_path(s.student, "model.student"))
        return cache_fingerprint(paths, self.tokenizer, tokenizers, data.corpus(), settings)

    def attach_cache(self, data=None) -> None:
        """Read the offline cache of `cache_dir`, after checking it was computed for this run."""
        self.cache = SourceCache(self.settings.cache_dir, self.cache_fingerprint(data), len(self.settings.sources))

    def configure_callbacks(self):
        if self.settings.cache_dir and self.settings.method.uses_sources:
            return [CacheWriter(self.settings.cache_dir, self.vocab_size)]  # acts in `predict` only
        return []

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        """Every source on every labelled row of the fusion corpus; then each unlabeled prompt
        answered as the method answers it, with the sources that run along that answer."""
        if dataloader_idx == 0 and all(batch["labelled"].tolist()):
            selected = torch.arange(len(self.settings.sources), device=self.device).expand(batch["input_ids"].shape[0], -1)
        else:
            batch = self.answer_prompts(batch)
            selected = batch["answer_sources"]
        return rows_to_records(batch, self.pool.to(self.device).run(selected, batch, self.settings.temperature), selected)

    # ---------------------------------------------------------------- the training step

    def answer_prompts(self, batch: dict) -> dict:
        """Give every unlabeled row of the batch the answer of the source the method picks.

        Online, the sources that will run along the answer are chosen first (the selector: its
        top-k from the prompt alone, without exploration noise, since nothing is observed on an
        unlabeled row), then the writer answers in its own tokens (`answers.write_answers`).
        Cached, the answer and its sources are read from the cache.

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
            sources, weighed = self.router.sources_for_answers(batch, todo)
            answers = write_answers([rows[b] for b in todo], sources, self.pool.to(self.device), self.tokenizer, self.settings, weighed)
        return along_answers(batch, dict(zip(todo, answers)), self.tokenizer, self.max_length)

    def on_policy(self, step: int) -> bool:
        """Whether step `step` learns along the student's own samples: with `response_from:
        student`, a share `on_policy_fraction` of the steps (`on_policy.is_on_policy_step`)."""
        return self.settings.response_from == "student" and is_on_policy_step(step, self.settings.on_policy_fraction)

    def sample(self, batch: dict) -> dict:
        """The student's response to every prompt of the batch, sampled in one `generate` call,
        without gradient; -> input_ids, attention_mask, targets [B, W] in student tokens (trained
        on the sampled tokens up to the first eos), completion, length [B] (`pack_rollouts`)."""
        s = self.settings
        return sample_responses(
            self.student, self.tokenizer, batch["prompt_ids"], batch["prompt_attention_mask"], s.sample_temperature, s.sample_max_new_tokens
        )

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
        With a selector, its regression and (while it explores) feedback terms are added.
        """
        s = self.settings
        on_policy = self.on_policy(self.global_step)
        joint = on_policy and s.on_policy_mix == "joint"
        if not on_policy or joint:  # the step reads along gold or the sources' answers
            batch = self.answer_prompts(batch)
        if not s.method.uses_sources:
            return self._supervised_step(batch)
        quality = self.router.quality(batch)  # [B, N]; None for a method that routes by rule
        selected = self.router.select(batch, quality, self.global_step, self.explores)  # [B, k]
        logs = {"train/on_policy": float(on_policy)}
        if on_policy:
            samples = self.sample(batch)
            rows = StepRows.on_policy(batch, samples, selected, joint, self.tokenizer.pad_token_id)
            logs |= {"train/sampled_tokens": samples["length"].sum().float(), "train/sample_length": samples["length"].float().mean()}
        else:
            rows = StepRows.off_policy(batch, selected)
        out, observed_ce, observed = self._run_sources(batch, rows, selected)
        if self.selector_rewards is not None:
            observed_ce, observed, reward_logs = reward_observations(batch, selected, self.pool.to(self.device), self.selector_rewards, s)
            logs |= reward_logs
        # A source with non-finite logits on a sequence is skipped there: weight 0, not observed.
        # A sequence left with no usable source gets no target, so no divergence, only gold CE.
        ce, valid = rows.weighing(out.ce), rows.weighing(out.valid)  # [B, k]
        weighed = valid & self.router.weighed(quality, selected)  # with a selection margin, a k per prompt
        alpha = self.router.weights(quality.gather(1, selected) if quality is not None else None, ce, weighed)  # [B, k]
        fused = rows.fused_target(out, alpha)
        # The student runs after the sources: their [positions, V] buffers are freed by now, so
        # the step's peak memory is the student's, as in plain SFT.
        logits = self.logits(rows.inputs["input_ids"], rows.inputs["attention_mask"])
        terms = losses.student_terms(
            logits, rows.inputs["targets"], fused, s.lam, s.temperature, s.divergence, s.jsd_beta, rows.samples, rows.joint
        )
        if self.curriculum is not None and not on_policy:  # the sources' NLL along each row's answer: their weighted CE
            self._update_curriculum(batch, logits, (alpha * torch.where(valid, ce, 0.0)).sum(-1))
        total = terms["loss"]
        logs |= self._step_logs(terms, alpha, selected, valid, batch)
        logs["train/weighed_sources"] = weighed.sum(-1).float().mean()  # per sequence: top_k, fewer with a selection margin
        if quality is not None:
            selector_terms, selector_logs = self.router.loss(quality, observed_ce, observed, batch, selected, valid, self.explores)
            total = total + selector_terms["selector"] + selector_terms["feedback"]
            logs |= selector_logs
        logs["train/loss"] = total
        stop_if_nonfinite(self, total, terms)
        self.log_dict(logs, prog_bar=False)
        self.log("loss", total, prog_bar=True, logger=False)
        return total

    def _supervised_step(self, batch: dict) -> torch.Tensor:
        """`fusion: none`: the CE along gold, no source."""
        logits = self.logits(batch["input_ids"], batch["attention_mask"])
        terms = losses.student_loss(logits, batch["targets"], None)
        stop_if_nonfinite(self, terms["loss"], terms)
        if self.curriculum is not None:  # no source: the gap is the student's own NLL along gold
            self._update_curriculum(batch, logits, torch.zeros(len(batch["targets"]), device=self.device))
        self.log_dict({"train/loss": terms["loss"], "train/ce": terms["ce"]}, prog_bar=True)
        return terms["loss"]

    def _run_sources(self, batch: dict, rows: StepRows, selected: torch.Tensor) -> tuple[SourceOutputs, torch.Tensor, torch.Tensor]:
        """The selected sources on the step's rows, and what the selector observes of every source
        (its CE along each labelled row's gold [B, N], and whether it was observed [B, N]).

        Cached, every source's CE on a labelled row is known: the selector observes all N.
        Online, the selected sources' CE along the rows read along gold or an answer: the
        labelled rows' are observed (CE along a source's answer or the student's sample is no
        quality signal)."""
        if self.cache is not None:
            return self.cache.lookup(batch, selected)
        # Every selected source's log-probability on the union of their supports: the exact mixture.
        out = self.pool.to(self.device).run(rows.sources, rows.inputs, self.settings.temperature, union=True)
        self.log_dict({f"align/{name}": value for name, value in self.pool.coverage.items()})  # positions with the source's distribution
        labelled = batch["labelled"].to(self.device)
        observed_ce = torch.zeros(len(selected), len(self.settings.sources), device=self.device)
        observed_ce = observed_ce.scatter(1, selected, rows.along_answers(out.ce))
        observed = torch.zeros_like(observed_ce, dtype=torch.bool).scatter(1, selected, rows.along_answers(out.valid))
        observed &= labelled[:, None]
        return out, observed_ce, observed

    def _step_logs(self, terms: dict, alpha: torch.Tensor, selected: torch.Tensor, valid: torch.Tensor, batch: dict) -> dict:
        """The student's terms, the dynamic weights' mean per source over the batch (0 where a source
        was not run), the skipped (row, source) pairs and the answers written this step."""
        names = self.settings.source_names
        logs = {
            "train/loss_student": terms["loss"],
            "train/ce": terms["ce"],
            "train/divergence": terms["divergence"],
            "train/alpha_max": alpha.max(-1).values.mean(),
        }
        mean_weight = torch.zeros(alpha.shape[0], len(names), device=alpha.device).scatter(1, selected, alpha).mean(0)
        logs |= {f"weight/{name}": mean_weight[i] for i, name in enumerate(names)}
        logs["train/source_skipped"] = (~valid).sum().float()
        self.log("faults/source_skipped", logs["train/source_skipped"], reduce_fx="sum", on_step=False, on_epoch=True, sync_dist=True)
        answers = [a for a in batch.get("answers") or [] if a is not None]
        if answers:
            logs |= {
                "train/answered": float(len(answers)),
                "train/empty_answers": float(sum(not a["text"] for a in answers)),
                "train/generations": float(sum(a["generations"] for a in answers)) if self.cache is None else 0.0,
            }
            if self.settings.answer_from == "fused" and self.cache is None:  # answer steps where a source had nothing to say
                logs["train/fused_renormalised"] = float(sum(a.get("renormalised", 0) for a in answers))
        return logs

    def _update_curriculum(self, batch: dict, logits: torch.Tensor, source_ce: torch.Tensor) -> None:
        """The curriculum's gap per row, from the student's sequence NLL along its response and the
        sources' (their per-token CE [B] times the row's trained tokens); logs the domains' weights."""
        targets = batch["targets"]
        tokens = (targets != IGNORE_INDEX).sum(-1)
        self.curriculum.update([row["domain"] for row in batch["rows"]], sequence_nll(logits.detach(), targets), source_ce * tokens)
        self.log_dict({f"curriculum/{d}": float(w) for d, w in zip(self.curriculum.domains, self.curriculum.weights())})

    # ---------------------------------------------------------------- the selector before the first step

    @torch.no_grad()
    def labelled_observations(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompt features [R, D] and every source's observed quality and validity [R, N] on the
        labelled train rows (`Router.observation`): its CE along gold, read from the cache or
        run once; with `selector_signal: rewards`, its -reward on its own answer (N generations
        per labelled row, once)."""
        features, ce, observed = [], [], []
        n = len(self.settings.sources)
        for batch in self.trainer.datamodule.labelled_loader():
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            features.append(self.router.features(batch))
            every = torch.arange(n, device=self.device).expand(batch["input_ids"].shape[0], n)
            if self.selector_rewards is not None:
                pool = self.pool.to(self.device)
                batch_ce, batch_observed, _ = reward_observations(batch, every, pool, self.selector_rewards, self.settings)
            elif self.cache is not None:
                _, batch_ce, batch_observed = self.cache.lookup(batch, every)
            else:
                out = self.pool.to(self.device).run(every, batch, self.settings.temperature)
                batch_ce, batch_observed = out.ce, out.valid
            ce.append(self.router.observation(batch_ce, batch["targets"]))
            observed.append(batch_observed)
        return torch.cat(features), torch.cat(ce), torch.cat(observed)

    def prefit_selector(self) -> None:
        """Fit the selector on the labelled rows, where every source's quality is observed once,
        before it routes the first prompt that has no gold (N source forwards per labelled row,
        once; read from the cache when there is one). A selector fitted or loaded already is kept."""
        if self.selector is None or self.settings.selector_prefit_steps == 0 or self.router.prefitted:
            return
        self.router.prefit(*self.labelled_observations())

    # ---------------------------------------------------------------- Lightning hooks

    def setup(self, stage: str) -> None:
        s = self.settings
        data = self.trainer.datamodule if self.trainer else None
        if data is not None:
            self.max_length = data.hparams.max_length
        unlabeled = data.load()["unlabeled"] if data is not None and stage in ("fit", "predict") else []
        if unlabeled and s.method.uses_sources:
            s.check_unlabeled(unlabeled)
        if stage == "predict":
            if not s.method.uses_sources or not s.cache_dir:
                raise ValueError("predict writes the offline cache: set model.cache_dir and a fusion method with sources")
            self.pool  # noqa: B018 (load now: a source that cannot be used fails before the first row)
        if stage == "fit" and s.method.uses_sources:
            if s.source_mode == "cached" and self.cache is None:
                self.attach_cache()
            elif s.source_mode == "online":
                self.pool  # noqa: B018 (load before the first step)
        if stage == "fit" and s.curriculum_floor is not None and data is not None:
            self.curriculum = DomainCurriculum(data.domain_names, s.curriculum_floor, s.curriculum_momentum)
        self.setup_eval_metrics(s.source_names if self.selector is not None else [])

    def on_fit_start(self) -> None:
        if self.trainer.datamodule.load()["unlabeled"] or self.settings.response_from == "student":
            if self.trainer.ckpt_path is None:
                self.prefit_selector()
            elif self.selector is not None and self.settings.selector_prefit_steps > 0:
                self.router.prefitted = True  # a resumed run restored the selector that was fitted at its start

    def on_predict_start(self) -> None:
        if self.trainer.datamodule.load()["unlabeled"] and self.settings.method.runs == "top_k":
            self.prefit_selector()

    def run_record(self) -> dict:
        return {"fusion": self.settings.fusion}

    def evaluation_selection(self, batch: dict) -> torch.Tensor | None:
        """Which sources the trained selector would run for these prompts (None without a selector)."""
        return noisy_top_k(self.router.quality(batch), self.settings.top_k) if self.selector is not None else None

    def parameter_groups(self) -> list[dict]:
        """The adapter's group, and the selector's at its own rate and without weight decay."""
        groups = super().parameter_groups()
        if self.selector is not None:
            groups.append({"params": list(self.selector.parameters()), "lr": self.settings.selector_learning_rate, "weight_decay": 0.0})
        return groups
