"""The LoRA student, shared by every training stage (fusion, SRFT): building it, loading a
trained adapter into it, sampling from it, and `StudentStage`, what both stages' LightningModules
share: the student's logits, evaluation, the optimizer and its learning-rate schedule, checkpoints
that keep only the trainable weights and the atomic `metrics.json` write.
"""

from __future__ import annotations

import glob
import math
import os
import warnings

import torch
from lightning.pytorch.callbacks import OnExceptionCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from fusion.data import IGNORE_INDEX
from fusion.data.tokenizer import load_tokenizer
from fusion.models import DTYPES, check_same_vocabulary, named_load, resolve_model_path
from fusion.stages.evaluation import correct, greedy_answers
from fusion.stages.metrics import EvalMetrics
from fusion.utils.io import atomic_write_json
from fusion.utils.resume import run_seed, start_next_epoch_cleanly, step_seed


def build_student(student: str, lora: dict, dtype: str = "float32", trust_remote_code: bool = False):
    """The base model with a fresh LoRA adapter (peft); only the adapter trains."""
    with named_load("model.student", student):
        base = AutoModelForCausalLM.from_pretrained(
            resolve_model_path(student, "model.student"), dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=True
        )
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; the user can do nothing about it
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **lora))


def resolve_init_from(path: str | None) -> str | None:
    """A checkpoint file or model directory; a glob pattern picks its newest match."""
    if path is None:
        return None
    if glob.has_magic(path):
        matches = sorted(glob.glob(path), key=os.path.getmtime)
        if not matches:
            raise FileNotFoundError(
                f"model.init_from: nothing matches {path!r} (run the earlier stage first, or set model.init_from: null)"
            )
        rank_zero_info(f"model.init_from: {matches[-1]} (the newest of {len(matches)} matching {path!r})")
        return matches[-1]
    if os.path.isfile(path):
        return path
    return resolve_model_path(path, "model.init_from")  # a model directory or a hub name


def start_student(student: str, init_from: str | None, lora: dict, dtype: str, trust_remote_code: bool, tokenizer):
    """Where a training stage's student starts -> (peft model, its base model, the resolved init_from).

    `init_from`: null (a fresh adapter on `student`), a checkpoint of an earlier stage (`.ckpt`:
    its adapter is loaded and trained on), a model directory (`fusion.export`'s output: the new
    base, with a fresh adapter; its tokenizer must be `tokenizer`'s) or a glob (its newest match).
    """
    init_path = resolve_init_from(init_from)
    base_model = student
    if init_path is not None and not os.path.isfile(init_path):  # a model directory: the new base
        check_same_vocabulary(tokenizer, load_tokenizer(init_path, trust_remote_code), "model.init_from")
        base_model = init_path
    model = build_student(base_model, lora, dtype, trust_remote_code)
    if init_path is not None and os.path.isfile(init_path):
        trained_base = load_adapter(model, init_path, "model.init_from")
        if trained_base and os.path.realpath(str(trained_base)) != os.path.realpath(base_model):
            rank_zero_warn(f"model.init_from: the adapter was trained on {trained_base!r}, model.student is {student!r}")
    return model, base_model, init_path


def load_adapter(student, ckpt_path: str, key: str) -> str | None:
    """Copy the `student.*` weights of a fusion checkpoint into `student` (a peft model).

    The checkpoint is read with `weights_only=True`. Keys and shapes must match the student's
    trainable weights exactly; otherwise the error names `key` and the checkpoint's own student
    and adapter settings. Returns the base model the adapter was trained on.
    """
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"{key}: {ckpt_path!r} does not exist")
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    adapter = {k.removeprefix("student."): v for k, v in checkpoint.get("state_dict", {}).items() if k.startswith("student.")}
    expected = {name: p.shape for name, p in student.named_parameters() if p.requires_grad}
    found = {name: v.shape for name, v in adapter.items()}
    if expected != found:
        h = checkpoint.get("hyper_parameters", {})
        missing = sorted(set(expected) - set(found))[:2]
        wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])[:2]
        raise ValueError(
            f"{key}: the adapter in {ckpt_path!r} does not fit model.student and model.lora "
            f"(missing {missing}, unexpected {sorted(set(found) - set(expected))[:2]}, wrong shape {wrong}); "
            f"it was trained with student={h.get('student')!r}, lora={h.get('lora')!r}"
        )
    student.load_state_dict(adapter, strict=False)
    return checkpoint.get("base_model") or checkpoint.get("hyper_parameters", {}).get("student")


def pack_rollouts(prompt_mask: torch.Tensor, generated: torch.Tensor, eos_id: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts followed by sampled completions -> right-padded training sequences.

    prompt_mask [R, P] (1 on prompt tokens), generated [R, P + L] as `generate` returns it. A
    completion ends at its first eos (kept, trained); what follows is padding. Returns the
    data module's layout: input_ids, attention_mask, targets (the next token on completion
    positions, else IGNORE_INDEX), all [R, W], plus completion [R, L] (eos and after set to
    pad, for decoding) and length [R] (completion tokens, eos included).
    """
    width = prompt_mask.shape[1]
    completion = generated[:, width:]  # [R, L]
    is_eos = (completion == eos_id).long()
    in_completion = (is_eos.cumsum(-1) - is_eos) == 0  # up to and including the first eos
    keep = torch.cat([prompt_mask.bool(), in_completion], dim=1)  # [R, P + L]
    trained = torch.cat([torch.zeros_like(prompt_mask, dtype=torch.bool), in_completion], dim=1)
    order = torch.sort((~keep).int(), dim=1, stable=True).indices  # kept tokens first, in order
    input_ids = generated.gather(1, order)
    keep, trained = keep.gather(1, order), trained.gather(1, order)
    length = int(keep.sum(1).max())
    input_ids = input_ids.masked_fill(~keep, pad_id)[:, :length]
    keep, trained = keep[:, :length], trained[:, :length]
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    targets[:, :-1] = torch.where(trained[:, 1:], input_ids[:, 1:], IGNORE_INDEX)
    return {
        "input_ids": input_ids,
        "attention_mask": keep.long(),
        "targets": targets,
        "completion": completion.masked_fill(~in_completion | (completion == eos_id), pad_id),
        "length": in_completion.sum(1),
    }


def pad_right(tensor: torch.Tensor, width: int, value: int) -> torch.Tensor:
    """[R, W'] -> [R, width], `value` appended on the right."""
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)


@torch.no_grad()
def sample_responses(
    student,
    tokenizer,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    temperature: float,
    max_new_tokens: int,
    num_return_sequences: int = 1,
) -> dict[str, torch.Tensor]:
    """Completions sampled from `student` for left-padded prompts [R, P], all in one `generate`
    call: pure sampling at `temperature` (no top-k or top-p), in eval mode (no dropout) and
    without gradient, so the ids are data, never a path for gradients. Packed by `pack_rollouts`
    ([R * num_return_sequences, W], prompt-major)."""
    was_training = student.training
    student.eval()
    generated = student.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        num_return_sequences=num_return_sequences,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    student.train(was_training)
    mask = prompt_mask.repeat_interleave(num_return_sequences, dim=0)
    return pack_rollouts(mask, generated, tokenizer.eos_token_id, tokenizer.pad_token_id)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, decay_fraction: float = 1.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup_steps` multiplied into a cosine decay to 0 at `total_steps`
    (stepped per optimizer step). With `decay_fraction` f the rate holds until step (1 - f) * T
    and the cosine spans the last f * T steps (warmup-stable-decay; f = 1, the default, decays
    over the whole run). The factor at step s (from 0) is

        min(1, (s + 1) / warmup_steps) * 0.5 * (1 + cos(pi * clamp((s - (1 - f) T) / (f T), 0, 1)))

    so the first step already runs at 1 / warmup_steps of the rate and, with f = 1, the cosine
    spans the whole run, warmup included. This is deliberately not transformers'
    `get_cosine_schedule_with_warmup`, which starts at 0 at step 0 (s / warmup_steps) and runs
    its cosine over the steps after the warmup only. `tests/test_student.py` pins the values.
    """
    if not 0.0 < decay_fraction <= 1.0:
        raise ValueError(f"decay_fraction must be in (0, 1], got {decay_fraction}")
    total = max(1, total_steps)
    decay = max(1.0, decay_fraction * total)
    start = total - decay

    def schedule(step: int) -> float:
        warmup = min(1.0, (step + 1) / max(1, warmup_steps))
        progress = min(1.0, max(0.0, (step - start) / decay))
        return warmup * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


class StudentStage:
    """What every training stage of the student shares (mixed into its LightningModule).

    A stage sets `settings` (a frozen dataclass with at least learning_rate, weight_decay,
    warmup_steps, lr_decay_fraction and max_new_tokens), `tokenizer`, `student` (the peft model),
    `vocab_size`, `base_model` and `eval_metrics` (None until `setup_eval_metrics`), and writes
    `training_step` and `run_record`. Evaluation answers each prompt greedily and scores it;
    the optimizer is AdamW over `parameter_groups()` with `warmup_cosine`. Checkpoints keep only
    the trainable weights (an adapter, a selector) and loading refuses one written for another
    setup; every training step reseeds the random number generator from (seed, rank, step,
    batch), so a run resumed mid-epoch draws what the uninterrupted run drew.
    """

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The student's next-token logits over the tokenizer's tokens, [R, W, V]. The output layer
        may have more rows than the tokenizer has tokens (embeddings padded to a round size): those
        ids are never a target nor a sample, so every loss and metric reads the first V columns."""
        return self.student(input_ids=input_ids, attention_mask=attention_mask).logits[..., : self.vocab_size]

    def forward(self, batch: dict) -> torch.Tensor:
        return self.logits(batch["input_ids"], batch["attention_mask"])

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        torch.manual_seed(step_seed(run_seed(), self.global_rank, self.global_step, batch_idx))

    def on_fit_end(self) -> None:
        # Lightning resumes the next `fit` from an existing OnExceptionCheckpoint file on its own.
        # Once a fit has completed, an older one is stale: left there, it would silently restart
        # the next run (or another run sharing its directory) from this one's interrupted state.
        if self.trainer.is_global_zero:
            for callback in self.trainer.callbacks:
                if isinstance(callback, OnExceptionCheckpoint) and os.path.isfile(callback.ckpt_path):
                    os.remove(callback.ckpt_path)

    # ---------------------------------------------------------------- evaluation

    def setup_eval_metrics(self, source_names: list[str]) -> None:
        """Per-domain accuracy and perplexity (and, given `source_names`, how often the selector
        would run each source), built once the data's domains are known."""
        if self.eval_metrics is None:
            data = self.trainer.datamodule if self.trainer else None
            self.eval_metrics = EvalMetrics(data.domain_names if data is not None else [], source_names)

    def evaluation_selection(self, batch: dict) -> torch.Tensor | None:
        """The sources the stage's selector would run for each prompt [B, k], which the metrics
        count; None (the default) for a stage without a selector."""
        return None

    def _evaluate(self, batch: dict) -> None:
        """The response's perplexity under teacher forcing and the greedy answer's exact match."""
        logits = self.logits(batch["input_ids"], batch["attention_mask"])
        answers = greedy_answers(
            self.student, self.tokenizer, batch["prompt_ids"], batch["prompt_attention_mask"], self.settings.max_new_tokens
        )
        selected = self.evaluation_selection(batch)
        self.eval_metrics.update(logits, batch["targets"], [r["domain"] for r in batch["rows"]], correct(answers, batch["rows"]), selected)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch)

    def _finish(self, prefix: str) -> dict:
        results = self.eval_metrics.compute()
        self.eval_metrics.reset()
        # The values are the whole split's on every process already (torchmetrics synchronized the
        # states); sync_dist averages equal values, which leaves them as they are.
        self.log_dict({f"{prefix}/{k}": v for k, v in results.items() if isinstance(v, float)}, sync_dist=True)
        return results

    def on_validation_epoch_end(self) -> None:
        self._finish("val")

    def on_test_epoch_end(self) -> None:
        results = self._finish("test")
        log_dir = self.trainer.log_dir  # a broadcast under DDP: every process must ask
        if self.trainer.is_global_zero and log_dir:
            atomic_write_json(os.path.join(log_dir, "metrics.json"), {**self.run_record(), **self.fit_record, **results})
        self.test_results = {**self.fit_record, **results}

    @property
    def fit_record(self) -> dict:
        """What the run's record says of its training beside the test metrics: `diverged`
        (`fusion.utils.callbacks.TrainingWatch`) and `checkpoint_step`, the step of the weights
        tested (a checkpoint loaded by `test --ckpt_path`, e.g. the best on validation). Saved in
        checkpoints."""
        if not hasattr(self, "_fit_record"):
            self._fit_record = {}
        return self._fit_record

    # ---------------------------------------------------------------- optimization and checkpoints

    def parameter_groups(self) -> list[dict]:
        """The optimizer's parameter groups: the adapter at `learning_rate`, its LoRA B matrices
        at `lora_b_lr_ratio` times that (one group when the ratio is 1)."""
        lr, ratio = self.settings.learning_rate, self.settings.lora_b_lr_ratio
        trainable = [(name, p) for name, p in self.student.named_parameters() if p.requires_grad]
        if ratio == 1.0:
            return [{"params": [p for _, p in trainable], "lr": lr}]
        b = [p for name, p in trainable if ".lora_B." in name]
        rest = [p for name, p in trainable if ".lora_B." not in name]
        return [{"params": rest, "lr": lr}, {"params": b, "lr": lr * ratio}]

    def configure_optimizers(self):
        settings = self.settings
        optimizer = torch.optim.AdamW(self.parameter_groups(), weight_decay=settings.weight_decay)
        scheduler = warmup_cosine(optimizer, settings.warmup_steps, self.trainer.estimated_stepping_batches, settings.lr_decay_fraction)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in trainable}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = self.trainable_state_dict()
        checkpoint["base_model"] = self.base_model  # what the adapter sits on (fusion.export reads it)
        checkpoint["fit_record"] = dict(self.fit_record)
        if getattr(self, "curriculum", None) is not None:
            checkpoint["curriculum"] = self.curriculum.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        start_next_epoch_cleanly(checkpoint)
        self._fit_record = dict(checkpoint.get("fit_record", {}))
        if getattr(self, "curriculum", None) is not None and "curriculum" in checkpoint:  # a resumed run draws as it did
            self.curriculum.load_state_dict(checkpoint["curriculum"])
        if self._trainer is not None and self.trainer.state.fn in ("validate", "test"):  # the weights evaluated
            self._fit_record["checkpoint_step"] = checkpoint.get("global_step")
        expected = {k: v.shape for k, v in self.trainable_state_dict().items()}
        found = {k: v.shape for k, v in checkpoint["state_dict"].items()}
        if expected != found:
            missing = sorted(set(expected) - set(found))[:3]
            unexpected = sorted(set(found) - set(expected))[:3]
            wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])[:3]
            raise ValueError(
                "the checkpoint was written for a different student, adapter or source list: "
                f"missing {missing}, unexpected {unexpected}, wrong shape {wrong}"
            )


def stop_if_nonfinite(module, total: torch.Tensor, terms: dict) -> None:
    """On a non-finite loss, save the last finite state (this step has not updated the weights
    yet) and stop. Under DDP one process's non-finite loss stops every process, before its
    backward pass could spread NaN gradients to the others: call it on every process."""
    here = not bool(torch.isfinite(total))
    anywhere = module.trainer.strategy.reduce_boolean_decision(here, all=False) if module._trainer is not None else here
    if not anywhere:
        return
    trainer = module.trainer
    path = os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints", "nonfinite.ckpt")
    trainer.save_checkpoint(path)
    parts = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
    loss = f"the training loss is {float(total)}" if here else "the training loss of another process is not finite"
    raise FloatingPointError(f"{loss} at step {module.global_step} ({parts}); saved the last finite state to {path} and stopped")
