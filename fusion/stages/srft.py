"""`SRFTModule`: supervised and reinforcement fine-tuning in one stage, weighted by entropy
(Fu et al. 2025), for a LoRA student that starts from a fused one.

Per training step, for each of the batch's B prompts: G rollouts are sampled from the student,
every rollout and the demonstration (the gold response) are scored by the reward functions,
and one forward over the B demos and B * G rollouts gives the three loss terms of
`fusion.objectives.srft_losses`. With `demonstrations` (a fusion stage's offline cache), the
stage also trains on the corpus's prompts without gold, each with the cached answer of the
source the fusion method routed it to as its demonstration (`SRFTModule.demonstrate`); no source
runs. Each batch of rollouts is used for one optimizer step (on-policy) and is
scored at the temperature it was sampled at, so the importance ratio between the policy trained
on and the one that sampled is 1 and nothing is clipped, as long as the training forward equals
the sampling one: sampling runs in eval mode, so that holds with no dropout (`lora.lora_dropout`
0, the default, and a base model without dropout).

Ablations are settings of this module: `mode` srft | sft_only | rl_only (GRPO-style: rollouts
only, no demo terms) and `weights` entropy | constant. Evaluation is every stage's
(`StudentStage`): greedy answers scored by each task's scorer, per-domain accuracy, `metrics.json`
after `test`.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field, fields
from typing import ClassVar

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from fusion.data import IGNORE_INDEX
from fusion.data.datamodule import collate, encode, is_labelled
from fusion.data.tokenizer import load_tokenizer
from fusion.models import DTYPES, named_load, resolve_model_path
from fusion.objectives import srft_losses
from fusion.sources.cache import read_answers, row_key
from fusion.stages.rewards import Rewards
from fusion.stages.student import StudentStage, pad_right, sample_responses, start_student, stop_if_nonfinite

REFERENCE_ADAPTER = "reference"  # the frozen copy of a checkpoint's starting adapter (KL term only)


@dataclass(frozen=True)
class SRFTSettings:
    """`SRFTModule`'s arguments (see its docstring), checked when built."""

    student: str = "checkpoints/zoo/student"
    init_from: str | None = None
    demonstrations: str | None = None
    mode: str = "srft"
    weights: str = "entropy"
    entropy_granularity: str = "batch"
    sft_weight: float = 0.5
    sft_sign: int = -1
    rl_weight: float = 0.1
    shaping: float = 0.1
    advantage_eps: float = 1e-6
    kl_weight: float = 0.0
    rewards: dict[str, float] = field(default_factory=lambda: {"fusion.stages.rewards.task_correct": 1.0})
    num_generations: int = 8
    temperature: float = 1.0
    max_new_tokens: int = 24
    lora: dict = field(default_factory=lambda: {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"})
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    dtype: str = "float32"
    trust_remote_code: bool = False
    lr_decay_fraction: ClassVar[float] = 1.0  # the cosine always spans the whole run (`warmup_cosine`)
    lora_b_lr_ratio: ClassVar[float] = 1.0  # one rate for the whole adapter

    def __post_init__(self) -> None:
        choices = {"mode": srft_losses.MODES, "weights": srft_losses.WEIGHTS, "entropy_granularity": srft_losses.GRANULARITIES}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"model.{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if self.sft_sign not in (-1, 1):
            raise ValueError(f"model.sft_sign must be -1 (w_SFT = 0.5 exp(-H), the paper) or 1 (exp(+H)), got {self.sft_sign!r}")
        fewest = 2 if self.mode == "rl_only" else 1
        if self.num_generations < fewest:
            raise ValueError(f"model.num_generations must be at least {fewest} with mode {self.mode!r}, got {self.num_generations}")
        if self.temperature <= 0 or self.max_new_tokens < 1:
            raise ValueError(
                f"model.temperature must be positive and model.max_new_tokens at least 1, got {self.temperature} and {self.max_new_tokens}"
            )
        for key in ("sft_weight", "rl_weight", "shaping", "advantage_eps", "kl_weight"):
            positive = key in ("shaping", "advantage_eps")
            if getattr(self, key) < 0 or (positive and getattr(self, key) == 0):
                raise ValueError(f"model.{key} must be {'positive' if positive else 'non-negative'}, got {getattr(self, key)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


class SRFTModule(StudentStage, L.LightningModule):
    """Single-stage SFT + RL of a LoRA student with entropy-aware weights.

    Args:
        student: path (or hub name) of the student's base model; its tokenizer is the data's.
        init_from: where the student starts: a fusion checkpoint (`.ckpt`, its LoRA adapter is
            loaded and trained on), a model directory (e.g. `fusion.export`'s output; a fresh
            adapter on it), a glob (its newest match), or null (a fresh adapter on `student`).
        demonstrations: null (the gold rows alone), or the directory of a fusion stage's offline
            cache (`model.cache_dir` of `python -m fusion.train predict` on a corpus with prompts
            without gold): the stage then trains on those prompts too, each with the cached
            answer of the source the fusion method routed it to as its demonstration (gold stays
            the demonstration of a row that has it). Every prompt without gold in the data must
            have an answer there; read once in `setup`, no source runs.
        mode: srft (all three terms), sft_only (L_SFT_demo), rl_only (L_RL_self, GRPO-style).
        weights: entropy (w_SFT = sft_weight * exp(sft_sign * H), c = rl_weight * exp(H) on
            positive advantages) or constant (the same at H = 0).
        entropy_granularity: token, sequence or batch (see `srft_losses.entropy_levels`).
        sft_weight, sft_sign: w_SFT = sft_weight * exp(sft_sign * H); sign -1 (paper) or +1.
        rl_weight: c_j = rl_weight * exp(H) for rollouts with a positive advantage, else 1.
        shaping: gamma of LUFFY's f(p) = p / (p + gamma) on the demo's RL term.
        advantage_eps: eps of A = (r - mean) / (std + eps).
        kl_weight: weight of KL(student || frozen starting student) on rollout tokens (0: off). The
            starting policy is read off the same model, never a copy of it: the base with the
            adapter disabled when the adapter starts fresh (LoRA B = 0, so the student is its
            base; init_from null or a model directory), else a second, frozen adapter
            (`reference`) holding the checkpoint's starting adapter.
        rewards: dotted path of a reward function -> weight (see `fusion.stages.rewards`).
        num_generations: G, rollouts per prompt (at least 2 in rl_only).
        temperature: sampling temperature of the rollouts (pure sampling, no top-k or top-p).
        max_new_tokens: longest rollout, and greedy decoding budget at evaluation.
        lora: peft LoraConfig arguments (must match an init_from checkpoint's adapter).
        learning_rate, weight_decay, warmup_steps: AdamW with warmup and cosine decay.
    """

    def __init__(
        self,
        student: str = "checkpoints/zoo/student",
        init_from: str | None = None,
        demonstrations: str | None = None,
        mode: str = "srft",
        weights: str = "entropy",
        entropy_granularity: str = "batch",
        sft_weight: float = 0.5,
        sft_sign: int = -1,
        rl_weight: float = 0.1,
        shaping: float = 0.1,
        advantage_eps: float = 1e-6,
        kl_weight: float = 0.0,
        rewards: dict[str, float] = {"fusion.stages.rewards.task_correct": 1.0},
        num_generations: int = 8,
        temperature: float = 1.0,
        max_new_tokens: int = 24,
        lora: dict = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"},
        learning_rate: float = 2e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 10,
        dtype: str = "float32",
        trust_remote_code: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.settings = SRFTSettings(**{name: self.hparams[name] for name in SRFTSettings.names()})
        self.reward_functions = Rewards(rewards)
        with named_load("model.student", student):
            self.tokenizer = load_tokenizer(resolve_model_path(student, "model.student"), trust_remote_code)
        self.student, self.base_model, self.init_path = start_student(student, init_from, lora, dtype, trust_remote_code, self.tokenizer)
        # The frozen starting policy of the optional KL term: None (no KL term), "base" (the adapter
        # disabled) or the name of a frozen second adapter. Never trained, never saved.
        self.reference = self._start_reference() if kl_weight > 0 else None
        self.vocab_size = len(self.tokenizer)
        self.eval_metrics = None  # built in `setup`, with the data's domains
        # With `demonstrations`: the cache's answers by row key, and how the data encodes a row
        # (read in `setup` by `load_demonstrations`).
        self.answers: dict[str, dict] | None = None
        self.max_length, self.chat = None, None
        self.strict_loading = False  # checkpoints hold the trainable weights only

    def _start_reference(self) -> str:
        """The starting policy for the KL term, in the student itself (peft's adapter switching)."""
        if self.init_path is None or not os.path.isfile(self.init_path):
            return "base"  # a fresh adapter (LoRA B = 0): the student starts as its base
        trained = self.student.active_adapter
        config = copy.deepcopy(self.student.peft_config[trained])
        config.inference_mode = True
        self.student.add_adapter(REFERENCE_ADAPTER, config)
        set_peft_model_state_dict(
            self.student, get_peft_model_state_dict(self.student, adapter_name=trained), adapter_name=REFERENCE_ADAPTER
        )
        self.student.set_requires_grad(REFERENCE_ADAPTER, requires_grad=False)
        return REFERENCE_ADAPTER

    @torch.no_grad()
    def reference_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the frozen starting policy (eval mode, no gradient), [R, W, vocab].

        The student's adapter is disabled, or the frozen reference adapter is made the active one
        for this forward; afterwards the trained adapter is active and trainable again (peft's
        `set_adapter` freezes the adapters it does not activate and unfreezes the one it does).
        """
        if self.reference is None:
            raise ValueError("the reference policy exists only with model.kl_weight > 0")
        was_training, trained = self.student.training, self.student.active_adapter
        self.student.eval()
        try:
            if self.reference == "base":
                with self.student.disable_adapter():
                    return self.logits(input_ids, attention_mask)
            self.student.set_adapter(self.reference, inference_mode=True)
            try:
                return self.logits(input_ids, attention_mask)
            finally:
                self.student.set_adapter(trained)
        finally:
            self.student.train(was_training)

    # ---------------------------------------------------------------- demonstrations

    @property
    def learns_from_unlabeled(self) -> bool:
        """Whether the train loader hands this stage the prompts without gold (`FusionDataModule`):
        only with `demonstrations`, which gives each of them one."""
        return self.settings.demonstrations is not None

    def load_demonstrations(self, data) -> None:
        """Read the answers of `demonstrations` for the prompts without gold of `data` (a
        `FusionDataModule`), or stop before any rollout: no such directory, no answer in it, or a
        prompt without gold that it has no answer for. Also refuses, here, a reward function that
        compares with gold while the data has prompts without it (`Rewards.check_gold`)."""
        path = self.settings.demonstrations
        if path is None:
            return
        self.max_length, self.chat = data.hparams.max_length, data.chat
        hint = "write it with `python -m fusion.train predict` (model.source_mode: cached) on a corpus with prompts without gold"
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model.demonstrations {path!r}: no such directory; it is a fusion stage's offline cache: {hint}")
        try:
            answers = read_answers(path)
        except ValueError as error:  # a shard that is incomplete or corrupted
            raise ValueError(f"model.demonstrations {path!r}: {error}") from error
        if not answers:
            raise ValueError(f"model.demonstrations {path!r} holds no answers for prompts without gold; {hint}")
        unlabeled = data.load()["unlabeled"]
        missing = [row for row in unlabeled if row_key(row) not in answers]
        if missing:
            raise ValueError(
                f"model.demonstrations {path!r} has no answer for {len(missing)} of the data's {len(unlabeled)} prompts "
                f"without gold (e.g. {missing[0]['prompt']!r}); write the cache with `python -m fusion.train predict` "
                "on the same data settings"
            )
        if not unlabeled:
            rank_zero_warn(f"model.demonstrations {path!r}: the data has no prompt without gold; the stage trains on the gold rows alone")
        self.reward_functions.check_gold(unlabeled, "the data (model.demonstrations)")
        self.answers = answers

    def demonstrate(self, batch: dict) -> dict:
        """The batch with each row's demonstration: its gold answer, or on a prompt without gold
        the cached answer of the source it was routed to ("" where that source wrote nothing:
        no demo terms for the prompt, its rollouts still train). Rows get a `demonstration`
        column (the reward functions' `demonstration`); a batch with prompts without gold is
        re-encoded along the demonstrations (as `fusion.stages.answers.along_answers` does for
        the fusion stage), a batch of gold rows is returned as it is."""
        rows = [row | {"demonstration": row["response"]} for row in batch["rows"]]
        todo = [b for b, row in enumerate(rows) if not is_labelled(row)]
        if not todo:
            return batch | {"rows": rows}
        if self.answers is None:
            raise ValueError(
                f"the batch has {len(todo)} prompt(s) without gold and no demonstration for them: set model.demonstrations "
                "to the fusion stage's offline cache of this data"
            )
        for b in todo:
            answer = self.answers.get(row_key(rows[b]))
            if answer is None:
                raise ValueError(
                    f"model.demonstrations {self.settings.demonstrations!r} has no answer for the prompt {rows[b]['prompt']!r}"
                )
            rows[b]["demonstration"] = answer["text"] or ""
        features = [
            encode(self.tokenizer, row["prompt"], row["demonstration"] or None, self.max_length, self.chat) | {"row": row} for row in rows
        ]
        collated = collate(features, self.tokenizer.pad_token_id)
        return {key: value.to(self.device) if torch.is_tensor(value) else value for key, value in collated.items()}

    # ---------------------------------------------------------------- rollouts and rewards

    def sample(self, batch: dict) -> dict[str, torch.Tensor]:
        """G sampled completions per prompt, packed for training ([B * G, W], prompt-major)."""
        h = self.settings
        return sample_responses(
            self.student,
            self.tokenizer,
            batch["prompt_ids"],
            batch["prompt_attention_mask"],
            h.temperature,
            h.max_new_tokens,
            h.num_generations,
        )

    def score(self, rows: list[dict], completions: list[str]) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Rewards of the rollouts [B, G] and of the demos [B] (`demonstrate`'s rows), in one call of each function."""
        group = self.settings.num_generations
        expanded = [row for row in rows for _ in range(group)] + rows
        columns = {key: [row.get(key) for row in expanded] for key in rows[0] if key != "prompt"}
        prompts = [row["prompt"] for row in expanded]
        rewards, means = self.reward_functions(prompts, completions + [row["demonstration"] for row in rows], columns)
        rewards = rewards.to(self.device)
        return rewards[: len(rows) * group].view(len(rows), group), rewards[len(rows) * group :], means

    # ---------------------------------------------------------------- the SRFT step

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        h = self.settings
        self.reward_functions.check_gold(batch["rows"], "the batch")  # before sampling: a refused reward costs no rollout
        batch = self.demonstrate(batch)
        rows = batch["rows"]
        size, group = len(rows), h.num_generations
        rollouts = self.sample(batch)
        texts = self.tokenizer.batch_decode(rollouts["completion"], skip_special_tokens=True)
        rewards, demo_rewards, reward_means = self.score(rows, texts)

        # One forward over the demos (first B rows) and the rollouts (next B * G rows).
        width = max(batch["input_ids"].shape[1], rollouts["input_ids"].shape[1])
        pad = self.tokenizer.pad_token_id
        input_ids = torch.cat([pad_right(batch["input_ids"], width, pad), pad_right(rollouts["input_ids"], width, pad)])
        attention_mask = torch.cat([pad_right(batch["attention_mask"], width, 0), pad_right(rollouts["attention_mask"], width, 0)])
        targets = torch.cat([pad_right(batch["targets"], width, IGNORE_INDEX), pad_right(rollouts["targets"], width, IGNORE_INDEX)])
        logits = self.logits(input_ids, attention_mask)
        mask = targets != IGNORE_INDEX  # [S, W]
        # The demos at T = 1 (their terms are off-policy: SFT and the shaped demo likelihood), the
        # rollouts at the temperature they were sampled at (on-policy: see `token_statistics`).
        reference_logits = None
        if self.reference is not None:
            reference_logits = self.reference_logits(input_ids[size:], attention_mask[size:])
        demo = srft_losses.token_statistics(logits[:size], targets[:size])
        rollout = srft_losses.token_statistics(logits[size:], targets[size:], h.temperature, reference_logits)
        token_logp, entropy = torch.cat([demo["logp"], rollout["logp"]]), torch.cat([demo["entropy"], rollout["entropy"]])  # [S, W]

        def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x[:size], x[size:].view(size, group, *x.shape[1:])

        (demo_logp, rollout_logp), (demo_mask, rollout_mask), (demo_h, rollout_h) = split(token_logp), split(mask), split(entropy)
        terms = srft_losses.srft_loss(
            demo_logp,
            demo_mask,
            demo_h,
            rollout_logp,
            rollout_mask,
            rollout_h,
            rewards,
            demo_rewards,
            mode=h.mode,
            weights=h.weights,
            granularity=h.entropy_granularity,
            sft_coefficient=h.sft_weight,
            sft_sign=h.sft_sign,
            rl_coefficient=h.rl_weight,
            shaping=h.shaping,
            eps=h.advantage_eps,
        )
        total = terms["loss"]
        logs = {f"train/{k}": terms[k] for k in ("sft_demo", "rl_demo", "rl_self", "entropy", "w_sft", "w_rl", "zero_std_groups")}
        if self.reference is not None:  # over the rollouts
            kl = srft_losses.masked_mean(rollout["kl"], mask[size:])
            total = total + h.kl_weight * kl
            logs["train/kl"] = kl
        has_demo = demo_mask.any(-1)  # [B]; False: an empty answer of a source
        labelled = torch.tensor([is_labelled(row) for row in rows], device=self.device)
        from_sources = int((has_demo & ~labelled).sum())
        logs |= {
            "train/loss": total,
            "train/reward_mean": rewards.mean(),
            "train/reward_std": rewards.std(correction=0),
            "train/demo_reward": srft_losses.masked_mean(demo_rewards, has_demo),
            "train/demo_advantage": srft_losses.masked_mean(terms["demo_advantage"], has_demo),
            "train/demos_from_sources": from_sources / max(int(has_demo.sum()), 1),  # of the demos trained on
            "train/empty_demos": float((~has_demo & ~labelled).sum()),
            "train/demo_nll": -srft_losses.masked_mean(demo_logp.detach(), demo_mask),
            "train/response_length": rollouts["length"].float().mean(),
            "train/generated_tokens": rollouts["length"].sum().float(),
        }
        logs |= {f"reward/{path}": value for path, value in reward_means.items()}
        domains = [row.get("domain") for row in rows]
        groups = [("gold_rows", labelled), ("answer_rows", ~labelled)]  # the rollouts' mean reward on each kind of row
        groups += [(f"domain/{d}", torch.tensor([x == d for x in domains], device=self.device)) for d in dict.fromkeys(domains) if d]
        for name, where in groups:
            if where.any():
                logs[f"reward/{name}"] = rewards[where].mean()
        stop_if_nonfinite(self, total, {k: terms[k] for k in ("sft_demo", "rl_demo", "rl_self")})
        self.log_dict(logs, batch_size=size)
        self.log("loss", total, prog_bar=True, logger=False, batch_size=size)
        return total

    # ---------------------------------------------------------------- evaluation (StudentStage's)

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.trainer.datamodule is not None:
            self.load_demonstrations(self.trainer.datamodule)
        self.setup_eval_metrics([])

    def run_record(self) -> dict:
        h = self.settings
        return {"stage": "srft", "mode": h.mode, "weights": h.weights, "init_from": self.init_path, "demonstrations": h.demonstrations}
