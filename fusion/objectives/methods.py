"""The fusion methods as one table: which sources run, how they are weighed, who answers a prompt
that has no gold answer. Every baseline is a row here and a setting (`model.fusion`) of the same
LightningModule; the module reads the row's fields, never the method's name.

    method      runs        weights                     answers an unlabeled prompt
    none        no source   -                           - (learns from labelled rows only)
    uniform     all N       equal                       a source chosen by a hash of the prompt
    avgce       all N       softmax(-CE)                - (needs gold: CE on the gold answer)
    mince       all N       the lowest CE               - (needs gold)
    confidence  all N       softmax(-CE)                the source most confident in its own answer (N generations)
    single      one fixed   1                           that source
    oracle      the domain's specialist   1             that specialist (needs the domain label)
    selector    top-k of the selector     dynamic       the selector's top source (1 generation)

CE is a source's cross-entropy along the response the student learns from: the gold answer on a
labelled row, the chosen source's answer on an unlabeled one. `confidence` is therefore AvgCE
where there is gold, and its label-free version where there is none.
"""

from __future__ import annotations

from dataclasses import dataclass

RUNS = ("none", "all", "top_k", "single", "domain")
WEIGHTS = ("equal", "softmax_ce", "min_ce", "dynamic")
ANSWERS = ("random", "most_confident", "first_selected")


@dataclass(frozen=True)
class Method:
    runs: str  # which sources run per sequence (RUNS)
    weights: str | None  # the fusion weights alpha over the sources that ran (WEIGHTS)
    answers: str | None  # who answers a prompt without gold (ANSWERS); None: the method needs gold

    @property
    def uses_sources(self) -> bool:
        return self.runs != "none"

    @property
    def learns_from_unlabeled(self) -> bool:
        return self.answers is not None


METHODS: dict[str, Method] = {
    "none": Method("none", None, None),
    "uniform": Method("all", "equal", "random"),
    "avgce": Method("all", "softmax_ce", None),
    "mince": Method("all", "min_ce", None),
    "confidence": Method("all", "softmax_ce", "most_confident"),
    "single": Method("single", "equal", "first_selected"),
    "oracle": Method("domain", "equal", "first_selected"),
    "selector": Method("top_k", "dynamic", "first_selected"),
}


def generations_per_prompt(method: Method, num_sources: int) -> int:
    """How many sources write an answer for one unlabeled prompt."""
    if method.answers is None:
        return 0
    return num_sources if method.answers == "most_confident" else 1
