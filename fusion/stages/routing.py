"""Routing: which sources run on each sequence, and the selector that learns to choose them.

Every method but the selector routes by a fixed rule (`Router.by_rule`): all N sources, one
fixed source, or the specialist of the row's domain (the oracle, which needs the domain label).
The selector (`fusion.objectives.selection`) reads each prompt's features (`PromptFeatures`),
predicts every source's quality u_i(x) and runs the top-k, with Gumbel noise while it explores.

It learns from what it observes (`Router.observation`, `reward_observations`): each selected
source's CE along a labelled row's gold, or the reward of the source's own answer. Observing
only what it selects, it could collapse onto one subset, hence the exploration noise and the
feedback loss (`Router.loss`). Before it routes the first prompt without gold it is fitted on
the labelled rows, where every source's quality is observed once (`Router.prefit`); a fitted or
loaded selector explores no more.
"""

from __future__ import annotations

import os

import torch
from lightning.pytorch.utilities import rank_zero_info

from fusion.data import IGNORE_INDEX
from fusion.objectives import fusion_rule, losses
from fusion.objectives.selection import SourceSelector, exploration_scale, fit_selector, noisy_top_k, prompt_features
from fusion.sources.cache import row_key
from fusion.sources.pool import SourcePool, source_name
from fusion.stages.fusion_settings import FusionSettings
from fusion.stages.rewards import Rewards

FEATURE_MEMORY = 2**30  # bytes of prompt features kept per process (float32: 65k rows at D = 4096)


class PromptFeatures:
    """The selector's input: the frozen base student's last hidden states, averaged over the
    prompt tokens. batch -> [B, D]

    The base (the adapter disabled), not the student being trained: its features do not move
    while the adapter learns, so what the selector learned on the labelled rows stays valid for
    every later prompt. (With the trained student's own features, an online selector that
    observes only what it selects lost track of every source it had stopped selecting, and
    routed unlabeled prompts to a distractor.) Causal attention: the prompt positions of the
    right-padded sequences are the prompt's alone, so only those are run. Since they never
    change, each row's features are computed once and kept, up to `memory` bytes; rows beyond
    it, and batches without their rows, are computed again each time.
    """

    def __init__(self, student, memory: int = FEATURE_MEMORY):
        self.student, self.memory = student, memory
        self.kept: dict[str, torch.Tensor] = {}  # row key -> features, on the CPU
        self.kept_bytes = 0

    @torch.no_grad()
    def __call__(self, batch: dict) -> torch.Tensor:
        keys = [row_key(row) for row in batch["rows"]] if "rows" in batch else [None] * len(batch["input_ids"])
        missing = [b for b, key in enumerate(keys) if key is None or key not in self.kept]
        if missing:
            rows = torch.tensor(missing, device=batch["input_ids"].device)
            prompt_mask = batch["prompt_mask"][rows]
            width = int(prompt_mask.sum(-1).max())
            with self.student.disable_adapter():
                hidden = self.student(
                    input_ids=batch["input_ids"][rows, :width],
                    attention_mask=batch["attention_mask"][rows, :width],
                    output_hidden_states=True,
                ).hidden_states[-1]
            computed = prompt_features(hidden, prompt_mask[:, :width]).float()
            if None in keys or self.kept_bytes + computed.numel() * 4 > self.memory:
                fresh = dict(zip(missing, computed))
                return torch.stack([fresh[b] if b in fresh else self.kept[key].to(computed.device) for b, key in enumerate(keys)])
            for b, features in zip(missing, computed.cpu()):
                self.kept[keys[b]] = features
            self.kept_bytes += computed.numel() * 4
        return torch.stack([self.kept[key] for key in keys]).to(batch["input_ids"].device)


class Router:
    """Which sources each sequence runs, and the selector's training (None for a rule-routed method).

    `prefitted`: the selector has observed every source once (`prefit`, or loaded from an earlier
    stage by `load`), so it explores no more.
    """

    def __init__(self, settings: FusionSettings, selector: SourceSelector | None, features: PromptFeatures):
        self.settings, self.selector, self.features = settings, selector, features
        self.prefitted = False

    def quality(self, batch: dict) -> torch.Tensor | None:
        """u [B, N]: the selector's predicted quality of every source for each prompt; None without a selector."""
        return self.selector(self.features(batch)) if self.selector is not None else None

    def select(self, batch: dict, quality: torch.Tensor | None, step: int = 0, explores: bool = False) -> torch.Tensor:
        """The sources each sequence runs. -> [B, k] source indices

        The selector's top-k of u, plus Gumbel noise annealed over the first `exploration_steps`
        while it `explores`; otherwise the method's rule. An answered prompt runs the sources
        chosen when its answer was written (`answer_sources`).
        """
        s = self.settings
        if s.method.runs == "top_k":
            noise = exploration_scale(step, s.exploration_noise, s.exploration_steps) if explores else 0.0
            selected = noisy_top_k(quality, s.top_k, noise)
        else:
            selected = self.by_rule(batch)
        fixed = batch.get("answer_sources")
        if fixed is not None:
            selected = torch.where(fixed[:, :1] >= 0, fixed.to(selected.device), selected)
        return selected

    def by_rule(self, batch: dict) -> torch.Tensor:
        """The sources of every method but the selector's. -> [B, k] source indices"""
        s, batch_size, n = self.settings, batch["input_ids"].shape[0], len(self.settings.sources)
        device = batch["input_ids"].device
        if s.method.runs == "single":
            return torch.full((batch_size, 1), s.source_names.index(s.single_source), device=device)
        if s.method.runs == "domain":
            s.check_oracle_domains({row["domain"] for row in batch["rows"]})
            index = [s.source_names.index(s.oracle[row["domain"]]) for row in batch["rows"]]
            return torch.tensor(index, device=device).unsqueeze(1)
        return torch.arange(n, device=device).expand(batch_size, n)  # uniform, avgce, mince, confidence

    def weighed(self, quality: torch.Tensor | None, selected: torch.Tensor) -> torch.Tensor:
        """Which of the selected sources are weighed: with `selection_margin`, those whose predicted
        quality is within the margin of the best selected one's (a k that adapts per prompt);
        otherwise all. quality [B, N] (None: a rule-routed method), selected [B, k] -> [B, k] bool"""
        margin = self.settings.selection_margin
        if quality is None or margin is None:
            return torch.ones(selected.shape, dtype=torch.bool, device=selected.device)
        chosen = quality.detach().gather(1, selected)
        return chosen >= chosen.max(-1, keepdim=True).values - margin

    @torch.no_grad()
    def sources_for_answers(self, batch: dict, rows: list[int]) -> tuple[list[list[int]], list[list[bool]]]:
        """The sources that will run along the answers to the batch's `rows` (prompts without gold):
        the selector's top-k from the prompt alone, without exploration noise (nothing is observed
        on an unlabeled row), or the method's rule; and which of them are weighed (`weighed`)."""
        s = self.settings
        if s.method.runs == "top_k":
            subset = {key: batch[key][rows] for key in ("input_ids", "attention_mask", "prompt_mask")}
            quality = self.selector(self.features(subset))
            selected = noisy_top_k(quality, s.top_k)
            return selected.tolist(), self.weighed(quality, selected).tolist()
        index = torch.tensor(rows, device=batch["input_ids"].device)
        subset = {"input_ids": batch["input_ids"][index], "rows": [batch["rows"][b] for b in rows]}
        selected = self.by_rule(subset)
        return selected.tolist(), self.weighed(None, selected).tolist()

    def weights(self, selected_quality: torch.Tensor | None, ce: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """alpha over the selected sources, 0 on a skipped one (`fusion_rule.fusion_weights`). [B, k] x3 -> [B, k]"""
        s = self.settings
        return fusion_rule.fusion_weights(s.method.weights, selected_quality, ce, valid, s.tau, s.gamma)

    def observation(self, ce: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """What the selector regresses onto [B, N]: each source's per-token CE along the rows'
        responses (or the -reward); with `selector_loss: likelihood`, their sequence NLL (CE times
        the response's trained tokens), whose exp is the probability of the whole response, as
        exact match needs."""
        if self.settings.selector_loss != "likelihood" or self.settings.selector_signal == "rewards":
            return ce
        return ce * (targets != IGNORE_INDEX).sum(-1, keepdim=True).to(ce.dtype)

    def loss(
        self,
        quality: torch.Tensor,
        observed_ce: torch.Tensor,
        observed: torch.Tensor,
        batch: dict,
        selected: torch.Tensor,
        valid: torch.Tensor,
        explores: bool,
    ) -> tuple[dict[str, torch.Tensor | float], dict]:
        """The selector's terms of the step's loss, and their logs.

        "selector": the regression of u onto the observed quality of each observed (row, source)
        pair (`losses.selector_loss`). "feedback": while the selector explores, beta * CV(I)^2,
        the spread of each source's importance I_j = sum_b pi_bj under the selection
        distribution pi = softmax(u / tau) (`losses.feedback_loss`), which keeps it from settling
        on one subset; else 0. The importance is summed where the selection decides what is
        observed: over the labelled rows (every row with the reward signal). observed_ce,
        observed: [B, N].
        """
        s, names = self.settings, self.settings.source_names
        pi = torch.softmax(quality / s.tau, dim=-1)  # [B, N]
        observed_ce = self.observation(observed_ce, batch["targets"])
        selector_term = losses.selector_loss(quality, observed_ce, observed, s.selector_loss)
        labelled = batch["labelled"].to(quality.device)
        balanced = torch.ones_like(labelled) if s.selector_signal == "rewards" else labelled
        feedback_term = losses.feedback_loss(pi[balanced]) if balanced.any() else pi.sum() * 0.0
        share = torch.zeros_like(quality).scatter(1, selected, valid.float()).mean(0)
        logs = {
            "train/loss_selector": selector_term,
            "train/loss_feedback": feedback_term,
            "train/selection_entropy": losses.entropy(share / share.sum()),
            "train/pi_entropy": losses.entropy(pi).mean(),
        }
        logs |= {f"select/{name}": share[i] for i, name in enumerate(names)}
        # The selector's signed error u_i - q_i (q = -CE or the reward) on observed pairs: > 0 where it overrates a source.
        residual = torch.where(observed, quality.detach() + observed_ce, 0.0).sum(0) / observed.sum(0).clamp(min=1)
        logs |= {f"bias/{name}": residual[i] for i, name in enumerate(names) if observed[:, i].any()}
        return {"selector": selector_term, "feedback": s.feedback_weight * feedback_term if explores else 0.0}, logs

    def prefit(self, features: torch.Tensor, ce: torch.Tensor, observed: torch.Tensor) -> None:
        """Fit the selector on every source's observed quality on the labelled rows (`fit_selector`):
        features [R, D], ce and observed [R, N], as `observation` gives them."""
        s = self.settings
        # `predict` runs under inference mode; the fit needs autograd, on tensors made outside it.
        with torch.inference_mode(False), torch.enable_grad():
            features, ce, observed = features.clone(), ce.clone(), observed.clone()
            result = fit_selector(self.selector, features, ce, observed, s.selector_prefit_steps, s.selector_learning_rate, s.selector_loss)
        self.prefitted = True
        rank_zero_info(
            f"selector: fitted on {len(features)} labelled rows before routing unlabeled prompts: {result['steps']} steps "
            f"(held-out regression loss {result['held_out_loss']:.3f}), top-1 agreement with the lowest CE "
            f"{result['top1_agreement']:.2f}"
        )

    def load(self, path: str) -> None:
        """The selector of the fusion checkpoint `path` (`init_from`), if it has one; then it counts
        as fitted. Its sources must be this run's, in the same order (a selector scores sources
        by position)."""
        if not os.path.isfile(path):
            return
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state = {k.removeprefix("selector."): v for k, v in checkpoint.get("state_dict", {}).items() if k.startswith("selector.")}
        if not state:
            return
        trained_for = [source_name(p) for p in checkpoint.get("hyper_parameters", {}).get("sources", [])]
        names = self.settings.source_names
        if trained_for != names:
            raise ValueError(
                f"model.init_from: the selector in {path!r} scores the sources {trained_for}, model.sources are "
                f"{names}: list the same sources in the same order, or start from a checkpoint without a selector"
            )
        self.selector.load_state_dict(state)
        self.prefitted = True
        rank_zero_info(f"model.init_from: the selector of {path!r} routes from the first step (not fitted again)")


@torch.no_grad()
def reward_observations(
    batch: dict, selected: torch.Tensor, pool: SourcePool, rewards: Rewards, settings: FusionSettings
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The selector's reward signal (`selector_signal: rewards`): each selected source answers each
    prompt of the batch (one `SourcePool.answer` call per source; an answer already written this
    step is reused) and `rewards` scores the answers. -> (-reward [B, N], observed [B, N]: exactly
    the selected pairs, logs). The reward functions get the rows' columns: on a prompt without
    gold, `response` and `metadata` are None."""
    rows, device = batch["rows"], batch["input_ids"].device
    texts = {(b, a["writer"]): a["text"] for b, a in enumerate(batch.get("answers") or []) if a is not None}
    written = 0
    for source in selected.unique().tolist():
        todo = [b for b in (selected == source).any(-1).nonzero(as_tuple=True)[0].tolist() if (b, source) not in texts]
        if todo:
            answers, _ = pool.answer(
                source,
                [rows[b]["prompt"] for b in todo],
                settings.response_max_new_tokens,
                settings.response_sampling,
                settings.response_temperature,
            )
            texts |= {(b, source): text.strip() for b, text in zip(todo, answers)}
            written += len(todo)
    pairs = [(b, source) for b, chosen in enumerate(selected.tolist()) for source in chosen]
    scored = [rows[b] for b, _ in pairs]
    columns = {key: [row.get(key) for row in scored] for key in scored[0] if key != "prompt"}
    values, means = rewards([row["prompt"] for row in scored], [texts[pair] for pair in pairs], columns)
    cost = torch.zeros(len(rows), len(settings.sources), device=device).scatter(1, selected, -values.to(device).view(selected.shape))
    observed = torch.zeros_like(cost, dtype=torch.bool).scatter(1, selected, True)
    return cost, observed, {"train/reward_generations": float(written), **{f"reward/{path}": value for path, value in means.items()}}
