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

Full models (any Hugging Face model directories of one architecture, e.g. specialists fine-tuned
from one base, or LoRA adapters folded into it) are merged with mergekit (`merge_models`, the
`merge` extra), whose methods work on the full weights:

    linear           sum_i w_i m_i / sum_i w_i (mergekit normalizes the weights)
    slerp            spherical interpolation of two models at `t` (0: the first, 1: the second)
    task_arithmetic  base + sum_i w_i (m_i - base)
    ties             TIES on the task vectors m_i - base: trim to `density`, elect signs, mean
    dare_ties        DARE (drop at random to `density`, rescale) and TIES' sign election
    dare_linear      DARE and the weighted sum (at density 1 it is task_arithmetic)
"""

from __future__ import annotations

import os
import tempfile

from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from fusion.data.tokenizer import load_tokenizer
from fusion.utils.io import atomic_directory, atomic_open
from fusion.utils.optional import mergekit_api


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
    weights = _weights(weights, len(adapters), "adapters")
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
    """Save a merged model with the base's tokenizer, atomically (`fusion.utils.io.atomic_directory`)."""
    with atomic_directory(directory) as temporary:
        model.save_pretrained(temporary, safe_serialization=True)
        load_tokenizer(base).save_pretrained(temporary)
    return directory


def _weights(weights: list[float] | float | str, count: int, what: str) -> list[float]:
    """One weight per input: a list, one number for all, or "mean" (1 / count)."""
    if weights == "mean":
        weights = 1.0 / count
    weights = [float(weights)] * count if isinstance(weights, (int, float)) else list(weights)
    if len(weights) != count:
        raise ValueError(f"{len(weights)} merge weights for {count} {what}")
    return weights


MERGEKIT_METHODS = ("linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear")
_WITH_BASE = ("task_arithmetic", "ties", "dare_ties", "dare_linear")  # merge the task vectors m_i - base


def _local_model(path: str, base: str | None, key: str) -> str:
    """A model directory as mergekit reads it (absolute, local); a LoRA adapter directory becomes
    mergekit's `base+adapter` (the adapter folded into `base` before merging)."""
    if "+" in path:
        raise ValueError(f"{key}: {path!r} holds '+', which mergekit reads as base+adapter; rename the directory")
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        if base is None:
            raise ValueError(f"{key}: {path!r} is a LoRA adapter: set base (the model it adapts) to fold it in before merging")
        return f"{_local_model(base, None, 'base')}+{os.path.abspath(path)}"
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"{key}: {path!r} is neither a model directory (config.json) nor a LoRA adapter directory "
            "(adapter_config.json); merge_models reads local directories only, never the hub"
        )
    return os.path.abspath(path)


def merge_models(
    models: list[str],
    output: str,
    method: str = "ties",
    base: str | None = None,
    weights: list[float] | float | str = 1.0,
    density: float | None = None,
    t: float = 0.5,
    dtype: str = "float32",
    seed: int = 0,
    parameters: dict | None = None,
) -> str:
    """Merge full models with mergekit (`MERGEKIT_METHODS`) and save the result to `output`.

    models: model directories of one architecture; a LoRA adapter directory of `base` is folded
        into `base` first (mergekit's `base+adapter`, in a temporary directory).
    base: the model the task vectors m_i - base are taken from (required by task_arithmetic, ties,
        dare_ties, dare_linear). linear and slerp merge `models` alone; there `base` only serves
        to fold adapters in and to give the tokenizer.
    weights: one per model, one for all, or "mean"; slerp takes `t` instead.
    density: the fraction of each task vector kept (ties, dare_*); mergekit's default 1 if None.
    seed: mergekit's random seed (DARE's random drops).
    parameters: further mergekit parameters of the whole merge, e.g. {"normalize": False}.

    Runs on the CPU from local directories only, writes safetensors (atomically, like
    `save_merged`) with the tokenizer of `base`, else of the first model (when it has one) and
    the merge's mergekit config (`mergekit_config.yml`). Returns `output`.
    """
    MergeConfiguration, MergeOptions, run_merge = mergekit_api()
    if method not in MERGEKIT_METHODS:
        raise ValueError(f"merge method must be one of {MERGEKIT_METHODS}, got {method!r}")
    if not models:
        raise ValueError("merge_models needs at least one model directory")
    if method == "slerp" and len(models) != 2:
        raise ValueError(f"slerp interpolates exactly 2 models, got {len(models)}")
    if method in _WITH_BASE and base is None:
        raise ValueError(f"{method} merges task vectors m_i - base: set base (the model the others were fine-tuned from)")
    paths = [_local_model(path, base, f"models[{i}]") for i, path in enumerate(models)]
    weights = _weights(weights, len(models), "models")
    settings = {"merge_method": method, "dtype": dtype, "parameters": dict(parameters or {})}
    if method == "slerp":
        settings["base_model"] = paths[0]
        settings["models"] = [{"model": path} for path in paths]
        settings["parameters"].setdefault("t", t)
    else:
        per_model = [{"weight": w} | ({"density": density} if density is not None and method != "linear" else {}) for w in weights]
        settings["models"] = [{"model": path, "parameters": p} for path, p in zip(paths, per_model)]
        if method in _WITH_BASE:
            settings["base_model"] = _local_model(base, None, "base")
    config = MergeConfiguration.model_validate(settings)
    with tempfile.TemporaryDirectory(prefix="fusion-merge-") as lora_cache, atomic_directory(output) as temporary:
        # mergekit copies the tokenizer of a model it picks (or re-saves it through AutoTokenizer,
        # which can change a custom tokenizer): the tokenizer saved here is `load_tokenizer`'s.
        options = MergeOptions(
            device="cpu",
            lora_merge_cache=lora_cache,
            copy_tokenizer=False,
            safe_serialization=True,
            write_model_card=False,
            random_seed=seed,
            quiet=True,
        )
        run_merge(config, temporary, options)
        with atomic_open(os.path.join(temporary, "mergekit_config.yml")) as f:
            f.write(config.to_yaml() + "\n")
        donor = base if base is not None else models[0]
        if os.path.isfile(os.path.join(donor, "tokenizer_config.json")):
            load_tokenizer(donor).save_pretrained(temporary)
    return output
