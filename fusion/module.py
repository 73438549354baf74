"""`FusionDistillModule`: a LoRA student distilled from N frozen sources.

The `fusion` setting picks how the target is built; every baseline of the method is a setting
of this one module:

    none      SFT on the gold tokens only, no source runs
    uniform   all N sources, equal weights
    avgce     all N sources, alpha = softmax(-CE)
    mince     all N sources, the lowest-CE source per sequence (FuseLLM's best)
    single    one fixed source (`single_source`)
    oracle    the specialist of the example's domain (`oracle`); an upper bound, never a method
    selector  ours: the selector's top-k sources, dynamic weights, feedback loss

Checkpoints hold the LoRA adapter and the selector only; sources and base weights are
rebuilt from their paths.
"""

from __future__ import annotations


import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
import torch

from fusion import losses
from fusion.evaluation import correct, greedy_answers
from fusion.cache import CacheWriter, SourceCache, cache_fingerprint, rows_to_records
from fusion.metrics import EvalMetrics
from fusion.selection import SourceSelector, exploration_scale, noisy_top_k, prompt_features
from fusion.student import StudentStage, build_student, stop_if_nonfinite, warmup_cosine
from fusion.tokenizer import load_tokenizer
from fusion.sources import DTYPES, SourcePool, resolve_model_path, source_name

FUSION_METHODS = ("none", "uniform", "avgce", "mince", "single", "oracle", "selector")


class FusionDistillModule(StudentStage, L.LightningModule):
    """Distil N frozen sources into a LoRA student.

    Args:
        student: path (or hub name) of the student's base model; its tokenizer is the data's.
        sources: paths (or hub names) of the source models; a source is named by its last path part.
        fusion: how the target is built, one of none, uniform, avgce, mince, single, oracle, selector.
        top_k: sources run per sequence with `selector` (1 <= top_k <= N).
        single_source: the source name used by `single`.
        oracle: domain -> source name, used by `oracle`.
        lam: weight of the gold CE; 1 - lam weighs the KL to the fused target.
        temperature: distillation temperature T (> 0).
        source_top_k: K, the support kept of each source's distribution per position (the fused
            target lives on the union of the selected sources' top-K, plus a tail bucket).
        unaligned: a student position where a source with another tokenizer has no token
            boundary gets no distribution from it ("mask") or a one-hot of the gold token
            ("gold_onehot").
        vocab_map: how source tokens map to student tokens: "exact+med" (exact string, else
            minimum edit distance), "exact+prefix" (exact, else the first student token of the
            source token's text) or "exact" (else dropped).
        vocab_map_dir: where vocabulary maps are cached, one file per pair of tokenizers.
        gamma: sharpness of the dynamic weights on observed quality (0: selector only).
        tau: temperature of the selection distribution pi = softmax(u / tau).
        feedback_weight: beta, weight of the CV^2 feedback loss.
        selector_loss: "mse" or "huber" regression of u onto -CE.
        initial_quality: the selector's starting prediction for every source.
        exploration_noise, exploration_steps: Gumbel noise scale at step 0, annealed to 0.
        lora: peft LoraConfig arguments.
        learning_rate, selector_learning_rate, warmup_steps: AdamW with warmup and cosine decay.
        max_new_tokens: greedy decoding budget at evaluation.
        source_mode: "online" runs the selected sources every step; "cached" reads their outputs
            from `cache_dir`, written beforehand by `predict` (see fusion/cache.py).
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
        unaligned: str = "mask",
        vocab_map: str = "exact+med",
        vocab_map_dir: str | None = "checkpoints/cache/vocab_maps",
        gamma: float = 1.0,
        tau: float = 1.0,
        feedback_weight: float = 0.1,
        selector_loss: str = "mse",
        selector_hidden: int = 64,
        initial_quality: float = -1.0,
        exploration_noise: float = 1.0,
        exploration_steps: int = 100,
        lora: dict = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"},
        learning_rate: float = 3e-3,
        selector_learning_rate: float = 3e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 20,
        max_new_tokens: int = 24,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        source_mode: str = "online",
        cache_dir: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self._check_settings()
        if trust_remote_code:
            rank_zero_warn("model.trust_remote_code is true: the student's and sources' own Python code will run")
        self.tokenizer = load_tokenizer(resolve_model_path(student, "model.student"), trust_remote_code)
        self.pool = self._load_pool() if fusion != "none" and source_mode == "online" else None
        self.cache: SourceCache | None = None
        self.source_names = [source_name(p) for p in sources]
        self._check_source_names()
        self.student = build_student(student, lora, dtype, trust_remote_code)
        self.selector = (
            SourceSelector(self.student.config.get_text_config().hidden_size, len(sources), selector_hidden, initial_quality)
            if fusion == "selector"
            else None
        )
        self.vocab_size = len(self.tokenizer)
        self.eval_metrics: EvalMetrics | None = None
        self.strict_loading = False  # checkpoints hold the trainable weights only

    def _check_settings(self) -> None:
        h = self.hparams
        if h.fusion not in FUSION_METHODS:
            raise ValueError(f"model.fusion must be one of {FUSION_METHODS}, got {h.fusion!r}")
        n = len(h.sources)
        if h.fusion != "none" and n == 0:
            raise ValueError(f"model.sources is empty; fusion {h.fusion!r} needs at least one source")
        if h.fusion == "selector" and not 1 <= h.top_k <= n:
            raise ValueError(f"model.top_k must be between 1 and the number of sources ({n}), got {h.top_k}")
        if h.temperature <= 0 or h.tau <= 0:
            raise ValueError(f"model.temperature and model.tau must be positive, got {h.temperature} and {h.tau}")
        if h.source_top_k < 1:
            raise ValueError(f"model.source_top_k must be at least 1, got {h.source_top_k}")
        if not 0.0 <= h.lam <= 1.0:
            raise ValueError(f"model.lam must be in [0, 1], got {h.lam}")
        if h.source_mode not in ("online", "cached"):
            raise ValueError(f"model.source_mode must be 'online' or 'cached', got {h.source_mode!r}")
        if h.source_mode == "cached" and not h.cache_dir:
            raise ValueError("model.source_mode is 'cached' but model.cache_dir is not set")
        if h.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {h.dtype!r}")

    def _check_source_names(self) -> None:
        h = self.hparams
        if h.fusion == "single" and h.single_source not in self.source_names:
            raise ValueError(f"model.single_source must name one of the sources {self.source_names}, got {h.single_source!r}")
        if h.fusion == "oracle":
            unknown = {d: s for d, s in (h.oracle or {}).items() if s not in self.source_names}
            if not h.oracle or unknown:
                raise ValueError(f"model.oracle must map each domain to one of the sources {self.source_names}, got {h.oracle!r}")

    def _load_pool(self) -> SourcePool:
        h = self.hparams
        return SourcePool(h.sources, self.tokenizer, h.dtype, h.trust_remote_code, h.source_top_k, h.unaligned, h.vocab_map, h.vocab_map_dir)

    # ---------------------------------------------------------------- the offline cache

    def cache_fingerprint(self, data=None) -> dict:
        """What a cache for this run depends on: sources, tokenizers, the fusion corpus, K and T."""
        h, data = self.hparams, data or self.trainer.datamodule
        paths = {name: resolve_model_path(path, f"model.sources[{i}]") for i, (name, path) in enumerate(zip(self.source_names, h.sources))}
        tokenizers = {name: load_tokenizer(path, h.trust_remote_code) for name, path in paths.items()}
        settings = {"top_k": h.source_top_k, "temperature": h.temperature, "unaligned": h.unaligned,
                    "vocab_map": h.vocab_map, "max_length": data.hparams.max_length}
        return cache_fingerprint(paths, self.tokenizer, tokenizers, data.load()["train"], settings)

    def attach_cache(self, data=None) -> None:
        """Read the offline cache of `cache_dir`, after checking it was computed for this run."""
        self.cache = SourceCache(self.hparams.cache_dir, self.cache_fingerprint(data), len(self.source_names))

    def configure_callbacks(self):
        if self.hparams.cache_dir and self.hparams.fusion != "none":
            return [CacheWriter(self.hparams.cache_dir, self.vocab_size)]  # acts in `predict` only
        return []

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """Every source on every row of the fusion corpus, as cache records."""
        selected = torch.arange(len(self.source_names), device=self.device).expand(batch["input_ids"].shape[0], -1)
        return rows_to_records(batch, self.pool.to(self.device).run(selected, batch, self.hparams.temperature))

    # ---------------------------------------------------------------- the fusion step

    def forward(self, batch: dict) -> torch.Tensor:
        return self.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[..., : self.vocab_size]

    def select(self, batch: dict, quality: torch.Tensor | None) -> torch.Tensor:
        """The sources each sequence runs. -> [B, k] source indices."""
        h, batch_size, n = self.hparams, batch["input_ids"].shape[0], len(self.source_names)
        device = batch["input_ids"].device
        if h.fusion == "selector":
            noise = exploration_scale(self.global_step, h.exploration_noise, h.exploration_steps) if self.training else 0.0
            return noisy_top_k(quality, h.top_k, noise)
        if h.fusion == "single":
            return torch.full((batch_size, 1), self.source_names.index(h.single_source), device=device)
        if h.fusion == "oracle":
            missing = sorted({row["domain"] for row in batch["rows"]} - set(h.oracle))
            if missing:
                raise ValueError(f"model.oracle has no source for domain(s) {missing}")
            index = [self.source_names.index(h.oracle[row["domain"]]) for row in batch["rows"]]
            return torch.tensor(index, device=device).unsqueeze(1)
        return torch.arange(n, device=device).expand(batch_size, n)  # uniform, avgce, mince

    def weights(self, selected_quality: torch.Tensor | None, ce: torch.Tensor) -> torch.Tensor:
        """alpha over the selected sources. [B, k] -> [B, k]"""
        h = self.hparams
        if h.fusion == "selector":
            return losses.dynamic_weights(selected_quality.detach(), ce, h.tau, h.gamma)
        if h.fusion == "avgce":
            return torch.softmax(-ce, dim=-1)
        if h.fusion == "mince":
            return torch.nn.functional.one_hot(ce.argmin(-1), ce.shape[-1]).float()
        return torch.full_like(ce, 1.0 / ce.shape[-1])  # uniform, single, oracle

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        h = self.hparams
        output = self.student(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=h.fusion == "selector"
        )
        logits, targets = output.logits[..., : self.vocab_size], batch["targets"]
        if h.fusion == "none":
            terms = losses.student_loss(logits, targets, None)
            stop_if_nonfinite(self, terms["loss"], terms)
            self.log_dict({"train/loss": terms["loss"], "train/ce": terms["ce"]}, prog_bar=True)
            return terms["loss"]

        quality = None
        if h.fusion == "selector":
            quality = self.selector(prompt_features(output.hidden_states[-1], batch["prompt_mask"]))  # [B, N]
        selected = self.select(batch, quality)  # [B, k]
        if self.cache is not None:  # every source's CE is known: the selector observes all N
            out, all_ce, all_valid = self.cache.lookup(batch, selected)
        else:
            out = self.pool.to(self.device).run(selected, batch, h.temperature)
            self.log_dict({f"align/{name}": value for name, value in self.pool.coverage.items()})  # exact-boundary coverage
            all_ce = torch.zeros(selected.shape[0], len(self.source_names), device=self.device).scatter(1, selected, out.ce)
            all_valid = torch.zeros_like(all_ce, dtype=torch.bool).scatter(1, selected, out.valid)
        ce, valid = out.ce, out.valid
        selected_quality = quality.gather(1, selected) if quality is not None else None
        # A source with non-finite logits on a sequence is skipped there: weight 0, not observed.
        # A sequence left with no usable source gets no target, so no KL, only gold CE.
        alpha = self.weights(selected_quality, ce.masked_fill(~valid, 1e4)) * valid  # [B, k]
        alpha = alpha / alpha.sum(-1, keepdim=True).clamp(min=1e-12)
        fused = losses.fused_target(out.ids, out.logprobs, alpha, out.aligned)
        terms = losses.student_loss(logits, targets, fused, h.lam, h.temperature)
        total = terms["loss"]
        logs = {"train/loss_student": terms["loss"], "train/ce": terms["ce"], "train/kl": terms["kl"],
                "train/alpha_max": alpha.max(-1).values.mean()}
        # The dynamic weights' mean per source over the batch (0 where a source was not run).
        mean_weight = torch.zeros(alpha.shape[0], len(self.source_names), device=alpha.device).scatter(1, selected, alpha).mean(0)
        logs |= {f"weight/{name}": mean_weight[i] for i, name in enumerate(self.source_names)}
        logs["train/source_skipped"] = (~valid).sum().float()
        self.log("faults/source_skipped", logs["train/source_skipped"], reduce_fx="sum", on_step=False, on_epoch=True, sync_dist=True)
        if quality is not None:
            pi = torch.softmax(quality / h.tau, dim=-1)  # [B, N]
            selector_term = losses.selector_loss(quality, all_ce, all_valid, h.selector_loss)
            feedback_term = losses.feedback_loss(pi)
            total = total + selector_term + h.feedback_weight * feedback_term
            share = torch.zeros_like(quality).scatter(1, selected, valid.float()).mean(0)
            logs |= {"train/loss_selector": selector_term, "train/loss_feedback": feedback_term,
                     "train/selection_entropy": losses.entropy(share / share.sum()),
                     "train/pi_entropy": losses.entropy(pi).mean()}
            logs |= {f"select/{name}": share[i] for i, name in enumerate(self.source_names)}
        logs["train/loss"] = total
        stop_if_nonfinite(self, total, terms)
        self.log_dict(logs, prog_bar=False)
        self.log("loss", total, prog_bar=True, logger=False)
        return total

    # ---------------------------------------------------------------- evaluation (hooks: StudentStage)

    def run_record(self) -> dict:
        return {"fusion": self.hparams.fusion}

    def setup(self, stage: str) -> None:
        h = self.hparams
        if stage == "predict" and self.pool is None:
            if h.fusion == "none" or not h.cache_dir:
                raise ValueError("predict writes the offline cache: set model.cache_dir and a fusion method with sources")
            self.pool = self._load_pool()
        if stage == "fit" and h.source_mode == "cached" and h.fusion != "none" and self.cache is None:
            self.attach_cache()
        if self.eval_metrics is None:
            domains = self.trainer.datamodule.domain_names if self.trainer and self.trainer.datamodule else []
            self.eval_metrics = EvalMetrics(domains, self.source_names if self.selector is not None else [])

    def _evaluate(self, batch: dict) -> None:
        output = self.student(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=self.selector is not None
        )
        answers = greedy_answers(self.student, self.tokenizer, batch["prompt_ids"], batch["prompt_attention_mask"], self.hparams.max_new_tokens)
        selected = None
        if self.selector is not None:  # which sources the trained selector would run for these prompts
            selected = noisy_top_k(self.selector(prompt_features(output.hidden_states[-1], batch["prompt_mask"])), self.hparams.top_k)
        logits = output.logits[..., : self.vocab_size]
        self.eval_metrics.update(logits, batch["targets"], [r["domain"] for r in batch["rows"]], correct(answers, batch["rows"]), selected)

    # ---------------------------------------------------------------- optimization and checkpoints (hooks: StudentStage)

    def configure_optimizers(self):
        h = self.hparams
        groups = [{"params": [p for p in self.student.parameters() if p.requires_grad], "lr": h.learning_rate}]
        if self.selector is not None:
            groups.append({"params": list(self.selector.parameters()), "lr": h.selector_learning_rate, "weight_decay": 0.0})
        optimizer = torch.optim.AdamW(groups, weight_decay=h.weight_decay)
        scheduler = warmup_cosine(optimizer, h.warmup_steps, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
