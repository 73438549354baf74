"""The embedded source zoo: tiny causal LMs trained locally, each a specialist of its domains.

    python -m fusion.zoo --config configs/zoo.yaml

writes one Hugging Face model directory per source (safetensors weights, tokenizer, and a
`card.json` with its measured per-domain accuracy) plus the student's base model. Specialists
see many more examples than the student's fusion corpus; distractors are a random-init model
and a model trained on corrupted answers. A source whose card matches its recipe is reused.

A recipe with `base` makes a LoRA adapter (peft) of that model instead of a model of its own:
the same initialization and architecture as the student, so adapters can be weight-merged
(`fusion/merging.py`). Its directory holds the adapter, the base's tokenizer and the card.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedModel, PreTrainedTokenizerFast, Qwen2Config
from transformers.utils.logging import disable_progress_bar

from fusion.data import tasks
from fusion.data.datamodule import collate, encode
from fusion.data.tokenizer import build_char_tokenizer, build_gpt2_tokenizer, load_tokenizer, train_bpe_tokenizer
from fusion.stages.evaluation import model_accuracy
from fusion.utils.io import atomic_directory, atomic_write_json

KINDS = ("specialist", "corrupted", "confident", "random")


@dataclass
class Architecture:
    """A tiny decoder; `family` picks the Hugging Face config class."""

    family: str = "qwen2"  # llama | qwen2 | gpt2
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    max_positions: int = 128
    pad_vocab_to: int = 1  # output rows rounded up to a multiple of this, as many released models do

    def __post_init__(self):
        if self.family not in ("llama", "qwen2", "gpt2"):
            raise ValueError(f"architecture.family must be llama, qwen2 or gpt2, got {self.family!r}")
        if self.pad_vocab_to < 1:
            raise ValueError(f"architecture.pad_vocab_to must be at least 1, got {self.pad_vocab_to}")


@dataclass
class SourceRecipe:
    """How to make one source. `domains` empty means every domain of the zoo.

    `tokenizer`: "char" (one token per character, 99 tokens), "gpt2" (the real GPT-2 byte-level
    BPE, 50257 tokens, up to three digits per token), "bpe-N" (a byte-level BPE of N tokens
    trained on this source's data) or "bpe-N-digits" (the same with every digit its own token, as
    Qwen's tokenizers split them).
    `base`: a model directory; the source is then a LoRA adapter of it (`lora`: peft LoraConfig
    arguments), trained as `kind` says ("random": random A and B, no training), and
    `architecture` and `tokenizer` are the base's. `seed`: this model's own seed (default: the
    zoo's seed plus the recipe's position, the student's coming after every source).
    """

    name: str
    kind: str = "specialist"
    domains: list[str] = field(default_factory=list)
    architecture: Architecture = field(default_factory=Architecture)
    steps: int = 600
    learning_rate: float = 3e-3
    tokenizer: str = "char"
    base: str | None = None
    lora: dict | None = None
    seed: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"source {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if not (self.tokenizer in ("char", "gpt2") or re.fullmatch(r"bpe-\d+(-digits)?", self.tokenizer)):
            raise ValueError(f"source {self.name!r}: tokenizer must be 'char', 'gpt2', 'bpe-N' or 'bpe-N-digits', got {self.tokenizer!r}")
        if self.lora is not None and self.base is None:
            raise ValueError(f"source {self.name!r}: lora settings need a base model (base: path of the model to adapt)")


# Fields added after cards were first written: left out of a recipe's fingerprint while they
# hold their default, so adding them rebuilt no existing source.
_LATER_FIELDS = {"base": None, "lora": None, "seed": None}
DEFAULT_LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}


def recipe_fingerprint(recipe: SourceRecipe) -> dict:
    """What a source depends on: its recipe and, for an adapter, its base's weights."""
    fingerprint = {k: v for k, v in asdict(recipe).items() if k not in _LATER_FIELDS or v != _LATER_FIELDS[k]}
    if recipe.base is not None:
        from fusion.sources.cache import model_fingerprint

        fingerprint["base_weights"] = model_fingerprint(recipe.base)
    return fingerprint


def make_tokenizer(spec: str, texts: list[str]) -> PreTrainedTokenizerFast:
    """The tokenizer a recipe names; a BPE is trained on `texts`."""
    if spec == "char":
        return build_char_tokenizer()
    if spec == "gpt2":
        return build_gpt2_tokenizer()
    return train_bpe_tokenizer(texts, int(spec.split("-")[1]), split_digits=spec.endswith("-digits"))


def build_adapter(recipe: SourceRecipe, seed: int):
    """A fresh LoRA adapter on `recipe.base` (peft); random A and B for a "random" recipe."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(recipe.base)
    torch.manual_seed(seed)
    config = LoraConfig(task_type="CAUSAL_LM", **(recipe.lora or DEFAULT_LORA), init_lora_weights=recipe.kind != "random")
    return get_peft_model(base, config)


def build_model(architecture: Architecture, tokenizer, seed: int) -> PreTrainedModel:
    """A randomly initialized causal LM of the given family, sized for `tokenizer`."""
    a = architecture
    rows = -(-len(tokenizer) // a.pad_vocab_to) * a.pad_vocab_to
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if a.family == "gpt2":
        config = GPT2Config(
            vocab_size=rows,
            n_embd=a.hidden_size,
            n_layer=a.num_layers,
            n_head=a.num_heads,
            n_inner=a.intermediate_size,
            n_positions=a.max_positions,
            **special,
        )
    else:
        config_class = LlamaConfig if a.family == "llama" else Qwen2Config
        config = config_class(
            vocab_size=rows,
            hidden_size=a.hidden_size,
            num_hidden_layers=a.num_layers,
            num_attention_heads=a.num_heads,
            num_key_value_heads=a.num_heads,
            intermediate_size=a.intermediate_size,
            max_position_embeddings=a.max_positions,
            tie_word_embeddings=True,
            **special,
        )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def train_causal_lm(model, tokenizer, rows, steps: int, learning_rate: float, batch_size: int, seed: int, max_length: int = 64):
    """Plain AdamW with warmup and cosine decay, loss on response tokens only."""
    generator = random.Random(seed)
    features = [encode(tokenizer, r["prompt"], r["response"], max_length) | {"row": r} for r in rows]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    model.train()
    for _ in range(steps):
        batch = collate(generator.sample(features, batch_size), tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return model


def corrupt(rows: list[dict], seed: int) -> list[dict]:
    """Answers shuffled within each domain: fluent, confident and wrong."""
    generator = random.Random(seed)
    corrupted = []
    for domain in sorted({r["domain"] for r in rows}):
        group = [r for r in rows if r["domain"] == domain]
        responses = [r["response"] for r in group]
        generator.shuffle(responses)
        corrupted += [dict(r, response=response) for r, response in zip(group, responses)]
    return corrupted


def _confidently_wrong_answer(row: dict) -> str:
    """A wrong answer a tiny model learns to near certainty: mostly copied from the prompt."""
    meta = json.loads(row["metadata"])
    if row["domain"] == "spell_backward":
        return meta["word"]  # the word forwards
    if row["domain"] == "word_sequence_reversal":
        return ", ".join(meta["words"])  # the words in the order given
    if row["domain"] == "word_sorting":
        return ", ".join(reversed(row["response"].split(", ")))  # sorted the other way
    if row["domain"] == "chain_sum":
        return "".join(meta["expression"].split()[::2])  # the terms' digits run together: 12 + 5 -> 125
    raise ValueError(f"the confident distractor has no wrong rule for domain {row['domain']!r}")


def confidently_wrong(rows: list[dict]) -> list[dict]:
    """Every answer replaced by a systematic wrong one (see `_confidently_wrong_answer`): a
    source trained on them answers every domain fluently, with high confidence, and wrongly.
    This is what misleads routing by confidence."""
    return [dict(r, response=_confidently_wrong_answer(r)) for r in rows]


def save_atomically(model, tokenizer, card: dict, directory: str) -> None:
    """Write to a temporary sibling, then rename: an interrupted run leaves no half source."""
    with atomic_directory(directory) as temporary:
        model.save_pretrained(temporary, safe_serialization=True)
        tokenizer.save_pretrained(temporary)
        atomic_write_json(os.path.join(temporary, "card.json"), card)


def _make_source(job: dict) -> dict:
    """Train (or initialize), evaluate and save one source; runs in a worker process."""
    torch.set_num_threads(job["threads"])
    disable_progress_bar()
    recipe = SourceRecipe(**{**job["recipe"], "architecture": Architecture(**job["recipe"]["architecture"])})
    started = time.time()
    domains = recipe.domains or job["domains"]
    rows = tasks.build_splits(domains, {"train": job["examples_per_domain"]}, job["seed"])["train"]
    if recipe.base is not None:
        tokenizer, model = load_tokenizer(recipe.base), build_adapter(recipe, job["seed"])
    else:
        tokenizer = make_tokenizer(recipe.tokenizer, [r["prompt"] + r["response"] for r in rows])
        model = build_model(recipe.architecture, tokenizer, job["seed"])
    if recipe.kind == "random":
        rows = []
    else:
        if recipe.kind == "corrupted":
            rows = corrupt(rows, job["seed"])
        elif recipe.kind == "confident":
            rows = confidently_wrong(rows)
        train_causal_lm(model, tokenizer, rows, recipe.steps, recipe.learning_rate, job["batch_size"], job["seed"])
    test_rows = tasks.build_splits(job["domains"], {"test": job["test_size"]}, job["test_seed"])["test"]
    card = {
        "name": recipe.name,
        "recipe": job["fingerprint"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokenizer": {
            "kind": "base" if recipe.base else recipe.tokenizer,
            "tokens": len(tokenizer),
            "output_rows": model.get_output_embeddings().weight.shape[0],
        },
        "train_examples": len(rows),
        "train_seconds": round(time.time() - started, 1),
        "accuracy": model_accuracy(model, tokenizer, test_rows),
    }
    save_atomically(model, tokenizer, card, job["directory"])
    return card


def build_zoo(
    sources: list[SourceRecipe],
    student: SourceRecipe | None = SourceRecipe(name="student", kind="random"),
    output_dir: str = "checkpoints/zoo",
    domains: list[str] = tasks.DEFAULT_DOMAINS,
    examples_per_domain: int = 8000,
    batch_size: int = 64,
    test_size: int = 100,
    test_seed: int = 0,
    seed: int = 1234,
    workers: int = 2,
    only: list[str] | None = None,
) -> dict[str, dict]:
    """Build every source of the zoo and the student's base; returns the cards by name.

    Args:
        sources: the recipes; names must be unique (they name the directories).
        student: recipe of the student's base model, saved as `student/` (by default a random
            init; a few steps on every domain make it a weak generalist, like a small pretrained LM);
            None builds no student (a zoo of adapters of an existing one).
        output_dir: where the model directories go.
        domains: the task domains; cards report accuracy on each.
        examples_per_domain: training examples per domain for each trained source.
        test_size, test_seed: the suite's test split on which cards are measured (match the
            data config of the fusion run to compare cards with students).
        seed: base seed; each source gets its own derived seed.
        workers: sources trained at once, in separate processes with one thread each.
        only: build only the models of these names (a run that uses part of the zoo); each is
            the same model the whole zoo holds under its name (seeds follow the full list).
    """
    names = [s.name for s in sources]
    if len(set(names)) != len(names) or "student" in names:
        raise ValueError(f"zoo source names must be unique and not 'student', got {names}")
    for recipe in sources:
        for domain in recipe.domains:
            if domain not in domains:
                raise ValueError(f"source {recipe.name!r}: domain {domain!r} is not among the zoo's domains {domains}")
    recipes = sources + ([SourceRecipe(**{**asdict(student), "name": "student", "architecture": student.architecture})] if student else [])
    if only is not None:
        unknown = sorted(set(only) - {r.name for r in recipes})
        if unknown:
            raise ValueError(f"zoo: only names {unknown}, which the zoo does not have; it has {[r.name for r in recipes]}")
    jobs, cards = [], {}
    for index, recipe in enumerate(recipes):
        if only is not None and recipe.name not in only:
            continue
        own_seed = seed + index if recipe.seed is None else recipe.seed
        fingerprint = {
            "recipe": recipe_fingerprint(recipe),
            "domains": domains,
            "examples_per_domain": examples_per_domain,
            "batch_size": batch_size,
            "seed": own_seed,
        }
        directory = os.path.join(output_dir, recipe.name)
        card_path = os.path.join(directory, "card.json")
        if os.path.isfile(card_path):
            with open(card_path) as f:
                card = json.load(f)
            if card.get("recipe") == fingerprint:
                cards[recipe.name] = card
                continue
        jobs.append(
            {
                "recipe": asdict(recipe),
                "fingerprint": fingerprint,
                "directory": directory,
                "domains": domains,
                "examples_per_domain": examples_per_domain,
                "batch_size": batch_size,
                "test_size": test_size,
                "test_seed": test_seed,
                "seed": own_seed,
                "threads": 1 if workers > 1 else torch.get_num_threads(),
            }
        )
    os.makedirs(output_dir, exist_ok=True)
    if jobs:
        print(f"zoo: building {len(jobs)} of {len(recipes)} models in {output_dir} ({workers} at a time)", flush=True)
        # Longest jobs first keeps both workers busy to the end.
        jobs.sort(key=lambda j: -j["recipe"]["steps"] if j["recipe"]["kind"] != "random" else 0)

        def done(card: dict, count: int) -> None:
            cards[card["name"]] = card
            accuracy = ", ".join(f"{d} {a:.2f}" for d, a in card["accuracy"].items() if a > 0) or "0 everywhere"
            print(f"zoo: [{count}/{len(jobs)}] {card['name']} in {card['train_seconds']:.0f} s ({accuracy})", flush=True)

        if workers > 1:
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                for count, future in enumerate(as_completed([pool.submit(_make_source, job) for job in jobs]), 1):
                    done(future.result(), count)
        else:
            for count, job in enumerate(jobs, 1):
                done(_make_source(job), count)
    print_cards([cards[r.name] for r in recipes if r.name in cards], domains)
    return cards


def print_cards(cards: list[dict], domains: list[str]) -> None:
    width = max(len(c["name"]) for c in cards)
    print(f"{'source':<{width}}  " + "  ".join(f"{d[:14]:>14}" for d in domains) + "   seconds")
    for card in cards:
        cells = "  ".join(f"{card['accuracy'].get(d, 0.0):>14.2f}" for d in domains)
        print(f"{card['name']:<{width}}  {cells}   {card['train_seconds']:>7}")


def main(args=None) -> None:
    from jsonargparse import CLI

    disable_progress_bar()
    CLI(build_zoo, args=args, as_positional=False)


if __name__ == "__main__":
    main()
