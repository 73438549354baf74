"""The settings of the fusion stage (`model.*` of `fusion.train`), checked once, before any model loads.

`FusionSettings` holds the arguments of `FusionDistillModule` (documented there), one field per
argument with the same name, default and order, and refuses a bad value or a bad combination
naming its `model.*` key. It also answers what the settings imply: the method's row of
`fusion.objectives.methods`, the sources' names, whether a run can read the offline cache, how
many sources run per sequence, and which settings the cache's numbers depend on. The quality
benchmark (`fusion.bench.quality`) reads the same answers to plan its runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from fusion.models import DTYPES
from fusion.objectives import losses
from fusion.objectives.curriculum import DomainCurriculum
from fusion.objectives.methods import METHODS, Method
from fusion.sources.pool import check_boundary, source_name

FUSION_METHODS = tuple(METHODS)
RESPONSES = ("source", "student")  # model.response_from
ON_POLICY_MIXES = ("alternate", "joint")  # model.on_policy_mix
SELECTOR_SIGNALS = ("gold_ce", "rewards")  # model.selector_signal
ANSWER_FROM = ("top", "fused")  # model.answer_from

# The settings the offline cache's distributions depend on (`FusionSettings.source_output_settings`):
# runs that differ in one of them cannot share a cache.
SOURCE_OUTPUT_SETTINGS = ("source_top_k", "temperature", "unaligned", "vocab_map", "boundary")
# With prompts without gold, the cache also holds their answers: who writes them and how
# (`FusionSettings.answer_settings`).
ANSWER_SETTINGS = (
    "fusion",
    "top_k",
    "selection_margin",
    "answer_from",
    "single_source",
    "oracle",
    "response_max_new_tokens",
    "response_sampling",
    "response_temperature",
    "selector_hidden",
    "initial_quality",
    "selector_prefit_steps",
    "selector_learning_rate",
    "selector_loss",
)


@dataclass(frozen=True)
class FusionSettings:
    """`FusionDistillModule`'s arguments (see its docstring), checked when built."""

    student: str = "checkpoints/zoo/student"
    sources: list[str] = field(default_factory=list)
    fusion: str = "selector"
    top_k: int = 2
    selection_margin: float | None = None
    single_source: str | None = None
    oracle: dict[str, str] | None = None
    lam: float = 0.9
    temperature: float = 1.0
    source_top_k: int = 10
    unaligned: str = "marginal"
    vocab_map: str = "exact+med"
    vocab_map_dir: str | None = None
    boundary: str | None = None
    gamma: float = 1.0
    tau: float = 1.0
    feedback_weight: float = 0.1
    selector_loss: str = "mse"
    selector_hidden: int = 64
    initial_quality: float = -1.0
    selector_prefit_steps: int = 500
    exploration_noise: float = 1.0
    exploration_steps: int = 100
    lora: dict = field(default_factory=lambda: {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"})
    learning_rate: float = 3e-3
    selector_learning_rate: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    lr_decay_fraction: float = 1.0
    lora_b_lr_ratio: float = 1.0
    max_new_tokens: int = 24
    response_max_new_tokens: int = 32
    response_sampling: bool = False
    response_temperature: float = 1.0
    response_from: str = "source"
    answer_from: str = "top"
    sample_temperature: float = 1.0
    sample_max_new_tokens: int = 32
    on_policy_fraction: float = 1.0
    on_policy_mix: str = "alternate"
    divergence: str = "forward_kl"
    jsd_beta: float = 0.5
    selector_signal: str = "gold_ce"
    selector_rewards: dict[str, float] = field(default_factory=lambda: {"fusion.stages.rewards.answer_format": 1.0})
    curriculum_floor: float | None = None
    curriculum_momentum: float = 0.9
    init_from: str | None = None
    dtype: str = "float32"
    trust_remote_code: bool = False
    source_mode: str = "online"
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        self._check_ranges()
        self._check_on_policy()
        self._check_source_names()

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    # ---------------------------------------------------------------- what the settings imply

    @property
    def method(self) -> Method:
        """The row of `fusion.objectives.methods.METHODS` the `fusion` setting names."""
        return METHODS[self.fusion]

    @property
    def source_names(self) -> list[str]:
        return [source_name(path) for path in self.sources]

    @property
    def resolved_boundary(self) -> str:
        """`boundary`, null resolved: "prefix" along the student's own samples (with `marginal`), else "token_end"."""
        if self.boundary is not None:
            return self.boundary
        return "prefix" if self.response_from == "student" and self.unaligned == "marginal" else "token_end"

    @property
    def online_only(self) -> bool:
        """Whether the sources score what is written during training (the student's samples, or the
        selected sources' own answers for the reward signal): no cache can hold it."""
        return self.response_from == "student" or self.selector_signal == "rewards"

    @property
    def pool_independent(self) -> bool:
        """Whether the run is the same in every pool that holds the domains' specialists: it runs no
        source, or only each domain's specialist."""
        return self.method.runs in ("none", "domain")

    @property
    def source_forwards(self) -> int:
        """Source forwards per training sequence when the sources run online."""
        return {"none": 0, "single": 1, "domain": 1, "top_k": self.top_k}.get(self.method.runs, len(self.sources))

    def pool_settings(self) -> dict:
        """How `SourcePool.load` reads the sources (its keyword arguments after the paths and the
        student's tokenizer): the module's pool and each Ray actor load them the same way."""
        from fusion.sources.vocab_map import default_cache_dir

        return {
            "dtype": self.dtype,
            "trust_remote_code": self.trust_remote_code,
            "top_k": self.source_top_k,
            "unaligned": self.unaligned,
            "vocab_map": self.vocab_map,
            "vocab_map_dir": self.vocab_map_dir or default_cache_dir(),
            "boundary": self.resolved_boundary,
        }

    def answer_settings(self) -> dict:
        """What an answer to an unlabeled prompt depends on: who answers, who runs along it, decoding
        (the `ANSWER_SETTINGS`)."""
        settings = {"fusion": self.fusion, "max_new_tokens": self.response_max_new_tokens, "sampling": self.response_sampling}
        if self.response_sampling:
            settings["temperature"] = self.response_temperature
        if self.method.runs == "top_k":  # the selector fitted on the labelled rows routes every prompt
            if self.answer_from == "fused":  # the weighed sources write together: the margin decides which
                settings |= {"answer_from": self.answer_from, "selection_margin": self.selection_margin}
            settings |= {
                "top_k": self.top_k,
                "selector": [
                    self.selector_hidden,
                    self.initial_quality,
                    self.selector_prefit_steps,
                    self.selector_learning_rate,
                    self.selector_loss,
                ],
            }
        if self.method.runs == "single":
            settings["single_source"] = self.single_source
        if self.method.runs == "domain":
            settings["oracle"] = self.oracle
        return settings

    def source_output_settings(self) -> dict:
        """What the sources' cached distributions depend on besides the models and the data (the
        `SOURCE_OUTPUT_SETTINGS`): K, T and how other tokenizers are read."""
        settings = {"top_k": self.source_top_k, "temperature": self.temperature, "unaligned": self.unaligned, "vocab_map": self.vocab_map}
        if self.resolved_boundary != "token_end":
            settings["boundary"] = self.resolved_boundary
        return settings

    # ---------------------------------------------------------------- checks against the data

    def check_unlabeled(self, rows: list[dict]) -> None:
        """A corpus with prompts without gold needs a method that answers them (and, routing by
        domain, a specialist for every domain among them)."""
        if not self.method.learns_from_unlabeled:
            raise ValueError(
                f"model.fusion {self.fusion!r} weighs sources by their CE on gold answers, and the fusion corpus has "
                f"{len(rows)} prompts without one (data.unlabeled_size, data.unlabeled_file or data.missing_response): use "
                "'confidence' (the label-free AvgCE), 'selector', 'uniform' or 'oracle', or leave the unlabeled prompts out"
            )
        if self.method.runs == "domain":
            self.check_oracle_domains({row["domain"] for row in rows})
        self.check_selector_rewards(rows)

    def check_selector_rewards(self, rows: list[dict]) -> None:
        """With `selector_signal: rewards` the answers to every prompt are scored, those without gold
        included: a reward function that compares with gold is refused here, before any answer is
        written, naming its `model.selector_rewards` key."""
        from fusion.stages.rewards import Rewards

        if self.selector_signal == "rewards":
            Rewards(self.selector_rewards, "model.selector_rewards").check_gold(
                rows, "the fusion corpus (data.unlabeled_size, data.unlabeled_file or data.missing_response)"
            )

    def check_oracle_domains(self, domains: set[str]) -> None:
        missing = sorted(domains - set(self.oracle))
        if missing == ["default"]:
            raise ValueError(
                "model.fusion 'oracle' routes each row by its domain label, and the data have none "
                "(data.domain_column is null or missing): set data.domain_column, or use the selector"
            )
        if missing:
            raise ValueError(f"model.oracle has no source for domain(s) {missing}")

    # ---------------------------------------------------------------- checks of the settings alone

    def _check_ranges(self) -> None:
        if self.fusion not in FUSION_METHODS:
            raise ValueError(f"model.fusion must be one of {FUSION_METHODS}, got {self.fusion!r}")
        n = len(self.sources)
        if self.fusion != "none" and n == 0:
            raise ValueError(f"model.sources is empty; fusion {self.fusion!r} needs at least one source")
        if self.fusion == "selector" and not 1 <= self.top_k <= n:
            raise ValueError(f"model.top_k must be between 1 and the number of sources ({n}), got {self.top_k}")
        if self.temperature <= 0 or self.tau <= 0:
            raise ValueError(f"model.temperature and model.tau must be positive, got {self.temperature} and {self.tau}")
        if self.source_top_k < 1:
            raise ValueError(f"model.source_top_k must be at least 1, got {self.source_top_k}")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"model.lam must be in [0, 1], got {self.lam}")
        if self.source_mode not in ("online", "cached"):
            raise ValueError(f"model.source_mode must be 'online' or 'cached', got {self.source_mode!r}")
        if self.source_mode == "cached" and not self.cache_dir:
            raise ValueError("model.source_mode is 'cached' but model.cache_dir is not set")
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not self.lora_b_lr_ratio > 0:
            raise ValueError(f"model.lora_b_lr_ratio must be positive, got {self.lora_b_lr_ratio}")
        if self.curriculum_floor is not None:
            DomainCurriculum([], self.curriculum_floor, self.curriculum_momentum)  # checks the two settings
        if self.response_max_new_tokens < 1 or self.response_temperature <= 0 or self.selector_prefit_steps < 0:
            raise ValueError(
                "model.response_max_new_tokens must be at least 1, model.response_temperature positive and "
                f"model.selector_prefit_steps at least 0, got {self.response_max_new_tokens}, {self.response_temperature} "
                f"and {self.selector_prefit_steps}"
            )

    def _check_on_policy(self) -> None:
        choices = {
            "response_from": RESPONSES,
            "divergence": losses.DIVERGENCES,
            "selector_signal": SELECTOR_SIGNALS,
            "on_policy_mix": ON_POLICY_MIXES,
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"model.{key} must be one of {allowed}, got {getattr(self, key)!r}")
        check_boundary(self.boundary, self.unaligned, null_ok=True)  # here: the pool loads only when sources first run
        if not 0.0 < self.jsd_beta < 1.0:
            raise ValueError(f"model.jsd_beta must be in (0, 1) (its ends are forward_kl and reverse_kl), got {self.jsd_beta}")
        if self.sample_temperature <= 0 or self.sample_max_new_tokens < 1 or not 0.0 <= self.on_policy_fraction <= 1.0:
            raise ValueError(
                "model.sample_temperature must be positive, model.sample_max_new_tokens at least 1 and "
                f"model.on_policy_fraction in [0, 1], got {self.sample_temperature}, {self.sample_max_new_tokens} and "
                f"{self.on_policy_fraction}"
            )
        needs_online = {"response_from": "student", "selector_signal": "rewards"}
        for key, value in needs_online.items():
            if getattr(self, key) == value and (self.fusion == "none" or self.source_mode != "online"):
                raise ValueError(
                    f"model.{key} {value!r} runs the sources on what is written during training: it needs "
                    f"model.source_mode 'online' and a fusion method with sources, got {self.source_mode!r} and {self.fusion!r}"
                )
        if self.selector_signal == "rewards" and self.selector_loss == "likelihood":
            raise ValueError(
                "model.selector_loss 'likelihood' reads a probability from CE along gold: use 'mse' or 'huber' with "
                "model.selector_signal 'rewards'"
            )
        if self.answer_from not in ANSWER_FROM:
            raise ValueError(f"model.answer_from must be one of {ANSWER_FROM}, got {self.answer_from!r}")
        for key, needs in (("answer_from", self.answer_from != "top"), ("selection_margin", self.selection_margin is not None)):
            if needs and self.fusion != "selector":
                raise ValueError(f"model.{key} acts on the selector's top-k: it needs model.fusion 'selector', got {self.fusion!r}")
        if self.selection_margin is not None and not self.selection_margin >= 0:
            raise ValueError(f"model.selection_margin must be at least 0 (or null: every one of the top-k), got {self.selection_margin}")
        if self.selector_signal == "rewards" and self.fusion != "selector":
            raise ValueError(f"model.selector_signal 'rewards' trains the selector: it needs model.fusion 'selector', got {self.fusion!r}")

    def _check_source_names(self) -> None:
        names = self.source_names
        if self.fusion == "single" and self.single_source not in names:
            raise ValueError(f"model.single_source must name one of the sources {names}, got {self.single_source!r}")
        if self.fusion == "oracle":
            unknown = {d: s for d, s in (self.oracle or {}).items() if s not in names}
            if not self.oracle or unknown:
                raise ValueError(f"model.oracle must map each domain to one of the sources {names}, got {self.oracle!r}")
