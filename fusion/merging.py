"""Weight merging: the baseline for sources that share the student's architecture and init.

Sources that are LoRA adapters of the student's base (zoo recipes with `base`, see
`fusion/zoo.py`) can be merged into one model without any training, with peft's
`add_weighted_adapter`. Its combination types differ in what they merge:

    cat        the exact weighted sum of the adapters' updates sum_i w_i B_i A_i (task arithmetic)
    svd        the same sum, truncated back to rank `svd_rank` by SVD
    ties_svd   TIES (trim to `density`, elect signs, disjoint mean) of the full updates, then SVD
    linear     weighted sums of the A and of the B matrices apart (cross terms B_i A_j included:
               a rough approximation, peft warns)
    ties       TIES of the A and of the B matrices apart (as linear, per factor)

The merged adapter is folded into the base (`merge_and_unload`) and saved as a plain Hugging Face
model with the base's tokenizer, so it is evaluated like any student: `fusion.train test` with
that directory as `model.student` (an untrained LoRA adapter is the identity).
"""

from __future__ import annotations

from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from fusion.io import atomic_directory
from fusion.tokenizer import load_tokenizer


def merge_adapters(
    base: str,
    adapters: list[str],
    combination_type: str = "ties_svd",
    weights: list[float] | float | str = 1.0,
    density: float | None = None,
    svd_rank: int | None = None,
):
    """The base model with the weighted merge of `adapters` (directories) folded in.

    weights: one per adapter, one for all, or "mean" (1 / number of adapters). svd_rank: rank of an
    SVD merge (default: the sum of the adapters' ranks, at most the smallest layer dimension, which
    keeps the merged update exact).
    """
    if not adapters:
        raise ValueError("merge_adapters needs at least one adapter directory")
    if weights == "mean":
        weights = 1.0 / len(adapters)
    weights = [float(weights)] * len(adapters) if isinstance(weights, (int, float)) else list(weights)
    if len(weights) != len(adapters):
        raise ValueError(f"{len(weights)} merge weights for {len(adapters)} adapters")
    names = [f"source{i}" for i in range(len(adapters))]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapters[0], adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:]):
        model.load_adapter(path, adapter_name=name)
    if combination_type.endswith("svd") and svd_rank is None:
        # The sum of the ranks holds the merged update exactly, up to the layers' own rank.
        smallest = min(min(m.get_base_layer().weight.shape) for m in model.modules() if isinstance(m, LoraLayer))
        svd_rank = min(smallest, sum(model.peft_config[name].r for name in names))
    options = {"density": density} if density is not None else {}
    model.add_weighted_adapter(names, weights, "merged", combination_type=combination_type, svd_rank=svd_rank, **options)
    model.set_adapter("merged")
    return model.merge_and_unload(adapter_names=["merged"]).eval()


def save_merged(model, base: str, directory: str) -> str:
    """Save a merged model with the base's tokenizer, atomically (`fusion.io.atomic_directory`)."""
    with atomic_directory(directory) as temporary:
        model.save_pretrained(temporary, safe_serialization=True)
        load_tokenizer(base).save_pretrained(temporary)
    return directory
