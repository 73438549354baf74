"""The offline cache built on Ray: the same cache `fusion.train predict` writes, one actor pool per source.

    python -m fusion.cache_ray --config configs/quickstart.yaml --config configs/cache.yaml
    python -m fusion.cache_ray --ray.address auto --ray.actors_per_source 4 --ray.gpus_per_actor 1 \\
        --config configs/real_models.yaml --config configs/cache.yaml

Every argument besides the `--ray.*` options is read as `python -m fusion.train predict` reads
its arguments (`--config` files, overrides such as `--data.unlabeled_size 100`), so the cache is
the one that command writes: the same `fingerprint.json`, the same Arrow shards
(`shard-r0-<n>`, cut after the same batches), the same records, readable by `model.source_mode:
cached` unchanged (`fusion.sources.cache`). The work is a Ray Data pipeline of the steps of
`FusionDistillModule.predict_step`, each batch of `predict` one item:

    student     the base student's prompt features: the selector's prefit on the labelled rows
                (fitted here, on every source's CE there), then its top-k for every prompt
                without gold (`routing`); rule-routed methods route here without a model
    answers     per source that can write an answer: the prompts it answers (`answers.write_answers`
                decides who writes; vLLM on a GPU where it is installed, else transformers' generate)
    scores      per source: its top-K along every row that runs it (`SourcePool.run`), every
                source on a labelled row, the k selected along an answer

Each source's model is loaded only by the actors of its own pools; the driver loads no model
(tokenizers only). Shards are written by the driver as soon as all their batches are scored.
A build that stops (a crash, Ctrl-C) is resumed by the same command: the shards already written
whose manifest and rows check out are kept, the rest are built. An actor that dies is
restarted by Ray and its batch retried (`--ray.max_restarts`).

    --ray.address            local (default): start a Ray on this machine for this command;
                             auto: join the cluster this machine belongs to; host:port or
                             ray://host:port: join that cluster (an address that does not
                             answer stops the command within --ray.connect_timeout seconds)
    --ray.actors_per_source  actors in each source's pools (and the student's, unless
                             --ray.student_actors)
    --ray.cpus_per_actor, --ray.gpus_per_actor   Ray resources of every actor (fractions allowed)
    --ray.answers            auto (vLLM where installed and the actor has a GPU), vllm, transformers
    --ray.shard_rows         rows per shard, cut after a whole batch (default: predict's 4096)
    --ray.fresh              rebuild every shard, even ones a resumed build would keep
    --ray.num_cpus, --ray.object_store_memory   the local Ray's size (with --ray.address local)

See docs/guides/ray_cache.md.
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import functools
import glob
import importlib.util
import json
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch

from fusion.data.datamodule import is_labelled
from fusion.sources.cache import _open_shard, row_key, rows_to_records, write_shard
from fusion.sources.pool import SourceOutputs

PROG = "python -m fusion.cache_ray"
ANSWER_BACKENDS = ("auto", "vllm", "transformers")
SHARD_ROWS = 4096  # `fusion.sources.cache.CacheWriter`'s default, what predict writes
# An error raised inside an actor reaches the driver inside Ray's own error text; these marks
# carry its type and message across, so the command reports it as predict would.
_MARK = "[[fusion.cache_ray error]]"


@dataclass
class RaySettings:
    """The `--ray.*` options (see the module's docstring)."""

    address: str = "local"
    actors_per_source: int = 1
    student_actors: int | None = None
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    answers: str = "auto"
    shard_rows: int = SHARD_ROWS
    fresh: bool = False
    num_cpus: int | None = None
    object_store_memory: int | None = None
    max_restarts: int = 3
    connect_timeout: float = 10.0

    def __post_init__(self) -> None:
        for key in ("actors_per_source", "shard_rows"):
            if getattr(self, key) < 1:
                raise ValueError(f"--ray.{key} must be at least 1, got {getattr(self, key)}")
        if self.student_actors is not None and self.student_actors < 1:
            raise ValueError(f"--ray.student_actors must be at least 1, got {self.student_actors}")
        if self.cpus_per_actor <= 0 or self.gpus_per_actor < 0:
            raise ValueError(
                f"--ray.cpus_per_actor must be above 0 and --ray.gpus_per_actor at least 0, got {self.cpus_per_actor} and {self.gpus_per_actor}"
            )
        if self.answers not in ANSWER_BACKENDS:
            raise ValueError(f"--ray.answers must be one of {ANSWER_BACKENDS}, got {self.answers!r}")
        if self.max_restarts < 0:
            raise ValueError(f"--ray.max_restarts must be at least 0, got {self.max_restarts}")
        if self.connect_timeout <= 0:
            raise ValueError(f"--ray.connect_timeout must be above 0 seconds, got {self.connect_timeout}")

    @property
    def threads(self) -> int:
        """torch threads per actor: its whole CPUs, at least one."""
        return max(1, int(self.cpus_per_actor))


# ------------------------------------------------------------------------------------ the predict command


@dataclass
class PredictCommand:
    """What `python -m fusion.train predict <args>` would run with, parsed, nothing built."""

    model: dict  # FusionDistillModule's init arguments
    data: dict  # FusionDataModule's
    config: str  # the whole parsed config as YAML, model paths made absolute: what the actors parse again


def parse_predict_command(args: list[str]) -> PredictCommand:
    """Parse `args` as `fusion.train predict` parses them (its config files and overrides, its
    seed), building nothing. Local model paths become absolute in `config`, so that actors
    started elsewhere (another directory, a cluster node with the same files) read the same."""
    from fusion.stages.fusion import FusionDistillModule
    from fusion.train import DEFAULT_MODEL, FusionCLI, main

    class Parsed(FusionCLI):
        def instantiate_classes(self) -> None:
            pass

        def _run_subcommand(self, subcommand: str) -> None:
            pass

    with _argv_alone():
        cli = main(["predict", *args], exit_on_error=False, cli=Parsed)
    config = cli.config["predict"]
    if config.get("ckpt_path"):
        raise ValueError(
            "ckpt_path: the cache does not depend on a trained adapter, and fusion.cache_ray reads none; "
            "start the student from a checkpoint with model.init_from, or build with fusion.train predict"
        )
    class_path = str(config["model"]["class_path"])
    if class_path != DEFAULT_MODEL and not class_path.endswith(f".{FusionDistillModule.__name__}"):
        raise ValueError(f"model.class_path {class_path!r}: only {DEFAULT_MODEL} writes the offline cache")
    init_args = config["model"]["init_args"]
    for key in ("student", "init_from", "vocab_map_dir"):
        if isinstance(init_args.get(key), str) and os.path.exists(init_args[key]):
            init_args[key] = os.path.abspath(init_args[key])
    init_args["sources"] = [os.path.abspath(p) if os.path.exists(p) else p for p in init_args.get("sources") or []]
    model = {**config["model"].as_dict().get("init_args", {}), **(config["model"].as_dict().get("dict_kwargs") or {})}
    text = cli._parser("predict").dump(config, skip_none=False)
    return PredictCommand(model=model, data=config["data"].as_dict(), config=text)


def build_module(config: str):
    """The `FusionDistillModule` that `fusion.train predict` builds from `config` (a YAML text
    from `parse_predict_command`): the same parser, the same seed before it is built, so its
    selector starts from the same weights."""
    from fusion.train import FusionCLI, main

    class Instantiated(FusionCLI):
        def instantiate_classes(self) -> None:
            self.config_init = self.parser.instantiate_classes(self.config)
            self.model = self._get(self.config_init, "model")

        def _run_subcommand(self, subcommand: str) -> None:
            pass

    with _argv_alone():
        return main(["predict", "--config", config], exit_on_error=False, cli=Instantiated).model


@contextlib.contextmanager
def _argv_alone() -> Iterator[None]:
    """sys.argv without its arguments while `fusion.train.main` parses given ones (LightningCLI
    warns when it sees both: this command's --ray options, or a Ray worker's own)."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


# ------------------------------------------------------------------------------------ the plan


def plan_shards(sizes: list[int], shard_rows: int) -> list[list[int]]:
    """The batches of each shard, cut as `CacheWriter` cuts them: after the batch that brings a
    shard to `shard_rows` rows or more, and after the last batch."""
    shards, pending, rows = [], [], 0
    for index, size in enumerate(sizes):
        pending.append(index)
        rows += size
        if rows >= shard_rows:
            shards.append(pending)
            pending, rows = [], 0
    if pending:
        shards.append(pending)
    return shards


def shard_name(number: int) -> str:
    return f"shard-r0-{number:05d}"


def prepare_directory(directory: str, fingerprint: dict, expected_keys: list[list[str]], fresh: bool) -> set[int]:
    """Make `directory` ready for this build; returns the shards kept from an earlier one.

    A directory whose fingerprint.json is this build's keeps each planned shard whose manifest
    checks out (`fusion.sources.cache._open_shard`: every file's size and checksum) and whose
    rows are the planned rows in order. Everything else named shard-* goes (half-written
    temporaries, shards of another plan), and a new fingerprint.json is written when it differs.
    """
    from fusion.utils.io import atomic_write_json

    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "fingerprint.json")
    current = False
    if os.path.isfile(path):
        with open(path) as f:
            try:
                current = json.load(f) == json.loads(json.dumps(fingerprint))
            except ValueError:
                current = False
    kept = set()
    if current and not fresh:
        for number, keys in enumerate(expected_keys):
            shard = os.path.join(directory, shard_name(number))
            if not os.path.isdir(shard):
                continue
            try:
                if list(_open_shard(shard)["key"]) == keys:
                    kept.add(number)
            except (OSError, ValueError):
                pass
    names = {shard_name(number) for number in kept}
    for old in glob.glob(os.path.join(directory, "shard-*")):
        if os.path.basename(old) not in names:
            shutil.rmtree(old, ignore_errors=True)
    if not current:
        atomic_write_json(path, fingerprint)
    return kept


# ------------------------------------------------------------------------------------ the steps of predict_step


class RecordedAnswers:
    """Stands in for the `SourcePool` that `answers.write_answers` asks for answers, so that the
    method's own code decides who writes: without `given` it records which prompts each source
    is asked (`asked`) and answers nothing; with `given` (source -> the texts and log-probs its
    actors wrote for exactly those prompts) it hands those back."""

    def __init__(self, given: dict | None = None):
        self.given, self.asked = given, {}

    def answer(self, source: int, prompts: list[str], *decoding) -> tuple[list[str], torch.Tensor]:
        if self.given is None:
            self.asked[source] = list(prompts)
            return [""] * len(prompts), torch.zeros(len(prompts))
        texts, logprob = self.given[source]
        if len(texts) != len(prompts):
            raise RuntimeError(f"source {source} answered {len(texts)} prompts of {len(prompts)}")
        return texts, logprob


def plan_answers(item: dict, sources: list[list[int]], tokenizer, settings) -> None:
    """Who answers each prompt of the item (`write_answers` with the sources that will run along
    each answer): sets `sources`, `asked` (source -> its prompts) and an empty `given`."""
    from fusion.stages.answers import write_answers

    rows = item["batch"]["rows"]
    recorder = RecordedAnswers()
    write_answers([rows[b] for b in item["todo"]], sources, recorder, tokenizer, settings)
    item["sources"], item["asked"], item["given"] = sources, recorder.asked, {}


def finish_answers(item: dict, tokenizer, settings, max_length: int) -> None:
    """The item's batch along its answers, as `FusionDistillModule.answer_prompts` re-encodes it
    (`write_answers` given the written answers, then `along_answers`); sets `selected`."""
    from fusion.stages.answers import along_answers, write_answers

    batch = item["batch"]
    rows = [batch["rows"][b] for b in item["todo"]]
    answers = write_answers(rows, item["sources"], RecordedAnswers(item["given"]), tokenizer, settings)
    batch = along_answers(batch, dict(zip(item["todo"], answers)), tokenizer, max_length)
    item["batch"], item["selected"] = batch, batch["answer_sources"]


def assemble(item: dict) -> list[dict]:
    """The item's records (`rows_to_records`) from each source's outputs on its rows, laid out
    over the [B, k] selection as `SourcePool.run` lays them out."""
    batch, selected = item["batch"], item["selected"]
    (size, k), length = selected.shape, batch["input_ids"].shape[1]
    outputs = item["outputs"]
    top = next(iter(outputs.values()))[1].ids.shape[-1]
    ids = torch.full((size, k, length, top), -1, dtype=torch.long)
    logprobs = torch.full((size, k, length, top), -float("inf"))
    ce, valid = torch.zeros(size, k), torch.ones(size, k, dtype=torch.bool)
    aligned = torch.zeros(size, k, length, dtype=torch.bool)
    for source, (rows, out) in outputs.items():
        slots = (selected[rows] == source).long().argmax(-1)
        ids[rows, slots], logprobs[rows, slots], aligned[rows, slots] = out.ids[:, 0], out.logprobs[:, 0], out.aligned[:, 0]
        ce[rows, slots], valid[rows, slots] = out.ce[:, 0], out.valid[:, 0]
    covered = torch.zeros(size, k, dtype=torch.bool)
    for source, (rows, _) in outputs.items():
        covered[rows] |= selected[rows] == source
    if not bool(covered.all()):
        raise RuntimeError(f"batch {item['index']}: a selected source returned no outputs")
    return rows_to_records(batch, SourceOutputs(ids, logprobs, ce, valid, aligned), selected)


def load_source(index: int, path: str, student_tokenizer, settings):
    """Source `index` alone as a `SourcePool`, loaded as `FusionDistillModule.pool` loads every
    source, with its errors naming `model.sources[index]`."""
    from fusion.models import resolve_model_path
    from fusion.sources.pool import SourcePool

    key = f"model.sources[{index}]"
    path = resolve_model_path(path, key)
    s = settings
    try:
        return SourcePool.load([path], student_tokenizer, **s.pool_settings())
    except (OSError, ValueError) as error:
        message = str(error).replace("model.sources[0]", key)
        try:
            renamed = type(error)(message)
        except TypeError:
            renamed = (OSError if isinstance(error, OSError) else ValueError)(message)
        raise renamed from None


def answer_backend(choice: str, device: torch.device) -> str:
    """Which library writes the answers: `choice` (--ray.answers), resolved where the actor runs."""
    installed = importlib.util.find_spec("vllm") is not None
    if choice == "vllm":
        if not installed:
            raise ImportError("--ray.answers vllm: vLLM is not installed where the answering actors run (pip install vllm)")
        if device.type != "cuda":
            raise ValueError("--ray.answers vllm: vLLM answers on a GPU; give each actor one with --ray.gpus_per_actor")
        return "vllm"
    if choice == "auto" and installed and device.type == "cuda":
        return "vllm"
    return "transformers"


class VLLMAnswers:
    """A source's answers from vLLM, read as `SourcePool.answer` reads transformers' `generate`:
    the same prompt tokens (`[bos] prompt`, cut from the left to the model's positions less the
    answer budget), greedy or sampled at the temperature, at most `max_new_tokens`; the answer is
    its tokens up to the first eos, decoded with special tokens skipped, and its log-probability
    at temperature 1 counts the tokens up to and including that eos."""

    def __init__(self, path: str, tokenizer, dtype: str, trust_remote_code: bool):
        from vllm import LLM

        self.tokenizer = tokenizer
        self.llm = LLM(model=path, tokenizer=path, dtype=dtype, trust_remote_code=trust_remote_code, seed=0)
        config = self.llm.llm_engine.model_config.hf_config
        self.width = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 1024)

    def answer(self, prompts: list[str], max_new_tokens: int, sampling: bool, temperature: float) -> tuple[list[str], torch.Tensor]:
        from vllm import SamplingParams

        from fusion.data.datamodule import encode

        eos = self.tokenizer.eos_token_id
        ids = []
        for prompt in prompts:
            encoded = encode(self.tokenizer, prompt, None, max(1, self.width - max_new_tokens))
            ids.append({"prompt_token_ids": encoded["input_ids"][: encoded["prompt_length"]]})
        params = SamplingParams(
            n=1,
            temperature=temperature if sampling else 0.0,
            top_p=1.0,
            max_tokens=max_new_tokens,
            logprobs=0,  # the sampled token's own log-probability at each step
            stop_token_ids=[eos] if eos is not None else None,
            skip_special_tokens=True,
        )
        texts, logprob = [], []
        for result in self.llm.generate(ids, params, use_tqdm=False):
            out = result.outputs[0]
            tokens = list(out.token_ids)
            end = tokens.index(eos) + 1 if eos in tokens else len(tokens)
            steps = out.logprobs or []
            logprob.append(sum(step[token].logprob for step, token in zip(steps[:end], tokens[:end])))
            texts.append(self.tokenizer.decode(tokens[: end - (eos in tokens)], skip_special_tokens=True))
        return texts, torch.tensor(logprob)


# ------------------------------------------------------------------------------------ the actors


def _stage_error(error: BaseException) -> RuntimeError:
    """An actor's error as a RuntimeError whose text carries its type and message (`_MARK`)."""
    details = "".join(traceback.format_exception(error)).rstrip()
    return RuntimeError(f"{_MARK}{type(error).__name__}{_MARK}{error}{_MARK}\n{details}")


def fusion_error(error: BaseException) -> BaseException | None:
    """The error an actor raised, rebuilt from Ray's error text (its type where that is a
    builtin error, else RuntimeError), or None when the error did not come from an actor."""
    seen, current = set(), error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        found = re.search(re.escape(_MARK) + r"(\w+)" + re.escape(_MARK) + r"(.*?)" + re.escape(_MARK), str(current), re.S)
        if found:
            kind = getattr(builtins, found.group(1), None)
            if not (isinstance(kind, type) and issubclass(kind, Exception)):
                kind = RuntimeError
            try:
                return kind(found.group(2))
            except TypeError:
                return RuntimeError(found.group(2))
        current = current.__cause__ or current.__context__
    return None


class _Stage:
    """A Ray Data callable: one pickled item (a batch of predict and what the steps so far made
    of it) per row in, the same item with this step's part out. Errors, in the constructor too,
    cross to the driver with their type and message (`_stage_error`)."""

    def __init__(self, **kwargs):
        import datasets
        from transformers.utils.logging import disable_progress_bar

        disable_progress_bar()  # the actors' weight-loading bars; the driver reports progress per shard
        datasets.disable_progress_bars()
        try:
            self.setup(**kwargs)
        except Exception as error:
            raise _stage_error(error) from None

    name = "stage"  # the pool's name in `Build.busy`

    def setup(self, **kwargs) -> None:
        """Load what the stage holds (each subclass: the student, or one source to answer or score)."""
        raise NotImplementedError  # an abstract hook: StudentStage and SourceStage define it

    def process(self, item: dict) -> dict:
        """One predict batch through this stage (each subclass)."""
        raise NotImplementedError  # an abstract hook: StudentStage and SourceStage define it

    def __call__(self, rows: dict) -> dict:
        out = []
        for payload in rows["item"]:
            started = time.perf_counter()
            try:
                item = self.process(pickle.loads(payload))
            except Exception as error:
                raise _stage_error(error) from None
            busy = item.setdefault("busy", {})
            busy[self.name] = busy.get(self.name, 0.0) + time.perf_counter() - started
            out.append(pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL))
        return {"index": rows["index"], "item": np.array(out, dtype=object)}


def _device(gpus: float) -> torch.device:
    return torch.device("cuda") if gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def _to(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}


class StudentStage(_Stage):
    """The base student and the selector: prompt features of labelled rows (for the prefit), and
    the selector's top-k for the prompts without gold. `selector`: the fitted selector's
    weights, or None (the module's own: loaded from `model.init_from`, or never fitted)."""

    name = "student"

    def setup(self, config: str, selector: dict | None, threads: int, gpus: float) -> None:
        torch.set_num_threads(threads)
        self.device = _device(gpus)
        self.module = build_module(config)
        if selector is not None:
            self.module.selector.load_state_dict(selector)
            self.module.router.prefitted = True
        self.module.eval().to(self.device)

    @torch.no_grad()
    def process(self, item: dict) -> dict:
        module, batch = self.module, _to(item["batch"], self.device)
        if item["kind"] == "labelled":
            if item.get("features"):
                item["features"] = module.router.features(batch).cpu()
                item["selector_start"] = {k: v.cpu() for k, v in module.selector.state_dict().items()}
                item["prefitted"] = module.router.prefitted
            return item
        sources, _ = module.router.sources_for_answers(batch, item["todo"])
        plan_answers(item, sources, module.tokenizer, module.settings)
        return item


class SourceStage(_Stage):
    """One source (`model.sources[index]`), loaded here only: `role` "answer" writes the answers
    it is asked for, "score" runs it along every row of the item that selected it."""

    def setup(
        self, index: int, path: str, role: str, settings, student: str, max_length: int, threads: int, gpus: float, answers: str
    ) -> None:
        from fusion.data.tokenizer import load_tokenizer
        from fusion.models import resolve_model_path

        torch.set_num_threads(threads)
        self.index, self.role, self.settings, self.max_length = index, role, settings, max_length
        self.name = f"{role} {index}"
        self.device = _device(gpus)
        self.tokenizer = load_tokenizer(resolve_model_path(student, "model.student"), settings.trust_remote_code)
        self.vllm = None
        if role == "answer" and answer_backend(answers, self.device) == "vllm":
            from fusion.data.tokenizer import load_tokenizer as load

            source_path = resolve_model_path(path, f"model.sources[{index}]")
            self.vllm = VLLMAnswers(source_path, load(source_path, settings.trust_remote_code), settings.dtype, settings.trust_remote_code)
        else:
            self.pool = load_source(index, path, self.tokenizer, settings).to(self.device)

    @torch.no_grad()
    def process(self, item: dict) -> dict:
        s = self.settings
        if self.role == "answer":
            prompts = item.get("asked", {}).get(self.index)
            if prompts:
                decoding = (s.response_max_new_tokens, s.response_sampling, s.response_temperature)
                if self.vllm is not None:
                    texts, logprob = self.vllm.answer(prompts, *decoding)
                else:
                    texts, logprob = self.pool.answer(0, prompts, *decoding)
                item["given"][self.index] = (texts, logprob.cpu())
            return item
        if "selected" not in item:  # the first scoring step re-encodes the batch along its answers
            finish_answers(item, self.tokenizer, s, self.max_length)
        rows = (item["selected"] == self.index).any(-1).nonzero(as_tuple=True)[0]
        if len(rows):
            batch = item["batch"]
            mine = {key: batch[key][rows].to(self.device) for key in ("input_ids", "attention_mask", "targets")}
            out = self.pool.run(torch.zeros(len(rows), 1, dtype=torch.long, device=self.device), mine, s.temperature)
            item.setdefault("outputs", {})[self.index] = (rows, SourceOutputs(*(t.cpu() for t in out)))
        return item


# ------------------------------------------------------------------------------------ Ray


def saved_signal_handlers() -> dict:
    """The process's SIGTERM and SIGINT handlers, for `restore_signal_handlers` after
    `ray.shutdown`. `ray.init` installs its own, which exit with the signal's number and outlive
    Ray: a training run later in the same process (Lightning chains the handler it finds) would
    exit on SIGTERM instead of writing its checkpoint."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}


def restore_signal_handlers(saved: dict) -> None:
    import signal

    for number, handler in saved.items():
        signal.signal(number, handler)


def connect(ray, settings: RaySettings) -> bool:
    """Start or join Ray as `--ray.address` says; returns whether this command started it (and
    so stops it). A Ray already started in this process (a test, a notebook) is used as it is."""
    if ray.is_initialized():
        return False
    quiet = {"include_dashboard": False, "log_to_driver": True}
    if settings.address == "local":
        ray.init(num_cpus=settings.num_cpus, object_store_memory=settings.object_store_memory, **quiet)
        return True
    address = settings.address
    if address == "auto":
        address = _auto_address(ray)
    _check_reachable(settings.address, address, settings.connect_timeout)
    ray.init(address=address, **quiet)
    return True


def _auto_address(ray) -> str:
    """The address `ray.init("auto")` would join (RAY_ADDRESS, else the cluster started on this
    machine), or a clear error when there is none."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    try:
        from ray._private.services import canonicalize_bootstrap_address_or_die

        return canonicalize_bootstrap_address_or_die("auto")
    except (ImportError, AttributeError):
        return "auto"
    except ConnectionError as error:
        raise ConnectionError(
            f"--ray.address auto: no Ray cluster runs on this machine ({str(error).splitlines()[0]}); start one with "
            "`ray start --head`, name its address, or build on a local Ray with --ray.address local"
        ) from None


# A separate process joins the cluster first: `ray.init` waits on an address that accepts
# connections but is no Ray cluster (or one that does not answer) for a minute or more.
_PROBE = "import sys, ray; ray.init(address=sys.argv[1], include_dashboard=False, log_to_driver=False); ray.shutdown()"


def _check_reachable(given: str, address: str, timeout: float) -> None:
    """Stop within `timeout` seconds when no Ray cluster answers at `address`: nothing listens
    there (a refused or unanswered connection), or a separate process cannot join it in time."""
    if address == "auto":
        return
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--ray.address {given!r}: expected local, auto, host:port or ray://host:port")
    advice = (
        "check the address and that the cluster is up (`ray status` on its head node), or build on a local Ray with --ray.address local"
    )
    started = time.monotonic()
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as error:
        reason = str(error) or type(error).__name__
        raise ConnectionError(
            f"--ray.address {given!r}: no Ray cluster answers at {host}:{port} ({reason}; waited at most {timeout:g} s, "
            f"--ray.connect_timeout); {advice}"
        ) from None
    left = max(1.0, timeout - (time.monotonic() - started))
    try:
        probe = subprocess.run([sys.executable, "-c", _PROBE, address], capture_output=True, text=True, timeout=left)
    except subprocess.TimeoutExpired:
        raise ConnectionError(
            f"--ray.address {given!r}: no Ray cluster answers at {host}:{port} (it accepts connections, but joining it did "
            f"not finish; waited at most {timeout:g} s, --ray.connect_timeout); {advice}"
        ) from None
    if probe.returncode != 0:
        lines = [line for line in probe.stderr.splitlines() if line.strip()]
        raise ConnectionError(
            f"--ray.address {given!r}: could not join the Ray cluster at {address}: {lines[-1] if lines else 'no reason given'}"
        )


@dataclass
class Pool:
    """One actor pool of the pipeline: a stage class and its constructor's arguments."""

    name: str
    stage: type
    kwargs: dict
    actors: int
    gpus: float = 0.0
    cpus: float = 1.0


def check_resources(ray, pools: list[Pool]) -> None:
    """Every pool's actors must fit in the cluster at once (Ray Data would wait on them forever)."""
    have = ray.cluster_resources()
    need = {"CPU": sum(p.actors * p.cpus for p in pools), "GPU": sum(p.actors * p.gpus for p in pools)}
    for kind, amount in need.items():
        if amount > have.get(kind, 0.0) + 1e-6:
            names = ", ".join(f"{p.name} {p.actors}" for p in pools)
            raise ValueError(
                f"the pipeline's {len(pools)} actor pools ({names} actors) need {amount:g} {kind}s at once, the Ray cluster has "
                f"{have.get(kind, 0.0):g}: lower --ray.cpus_per_actor or --ray.gpus_per_actor (fractions are fine), "
                "--ray.actors_per_source or --ray.student_actors, or add machines"
            )


def run_pipeline(ray, items: list[dict], pools: list[Pool], settings: RaySettings) -> Iterator[dict]:
    """Each item through the pools in order, as a Ray Data stream: items come back as they finish."""
    if not items:
        return
    check_resources(ray, pools)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    dataset = ray.data.from_items(
        [{"index": item["index"], "item": pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)} for item in items],
        override_num_blocks=len(items),
    )
    for pool in pools:
        dataset = dataset.map_batches(
            pool.stage,
            fn_constructor_kwargs=pool.kwargs,
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=pool.actors),
            num_cpus=pool.cpus,
            num_gpus=pool.gpus,
            ray_remote_args_fn=functools.partial(dict, max_restarts=settings.max_restarts, max_task_retries=settings.max_restarts),
        )
    try:
        for row in dataset.iter_rows():
            yield pickle.loads(row["item"])
    except Exception as error:
        cause = fusion_error(error)
        if cause is None:
            raise
        raise cause from error


# ------------------------------------------------------------------------------------ the build


@dataclass
class Build:
    """What `build_cache` did."""

    directory: str
    rows: int
    shards: int
    written: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # Seconds each pool's actors spent on the items, all actors together: "student",
    # "answer <i>", "score <i>" (source i). The pool with the most bounds the pipeline's pace.
    busy: dict[str, float] = field(default_factory=dict)
    # Wall seconds of the build's parts: "prepare" (the config, the data, the plan, the
    # directory), "actors starting" (each pipeline's start to its first item back), "batches"
    # (its first item back to its last, shards written), "prefit" (the selector's, here).
    phases: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("prepare", "actors starting", "batches", "prefit"), 0.0))

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def build_cache(
    args: list[str],
    settings: RaySettings | None = None,
    on_shard: Callable[[str], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> Build:
    """Build the offline cache `python -m fusion.train predict <args>` writes, on Ray.

    `on_shard(path)` runs after each shard is written (a test interrupts the build there).
    """
    started = time.perf_counter()
    settings = settings or RaySettings()
    log = log or functools.partial(print, file=sys.stderr, flush=True)
    from fusion.utils.optional import ray_data

    ray = ray_data()
    from fusion.data.datamodule import FusionDataModule
    from fusion.data.tokenizer import load_tokenizer
    from fusion.models import resolve_model_path
    from fusion.stages.fusion import FusionDistillModule
    from fusion.stages.fusion_settings import FusionSettings

    command = parse_predict_command(args)
    s = FusionSettings(**{name: command.model[name] for name in FusionSettings.names() if name in command.model})
    if not s.method.uses_sources or not s.cache_dir:
        raise ValueError("predict writes the offline cache: set model.cache_dir and a fusion method with sources")
    if s.selector_signal == "rewards":
        raise ValueError(
            "model.selector_signal 'rewards': the sources score answers written during training, which no cache holds; "
            "use selector_signal gold_ce with the cache"
        )
    if s.answer_from == "fused":
        raise ValueError(
            "model.answer_from 'fused': the selected sources write each answer together, one token at a time, which "
            "the Ray stages (one source per actor) do not do; build this cache with python -m fusion.train predict"
        )
    student = resolve_model_path(s.student, "model.student")
    paths = [resolve_model_path(path, f"model.sources[{i}]") for i, path in enumerate(s.sources)]
    tokenizer = load_tokenizer(student, s.trust_remote_code)
    data = FusionDataModule(**command.data)
    data.setup("predict")
    unlabeled = data.load()["unlabeled"]
    if unlabeled:
        s.check_unlabeled(unlabeled)
    fingerprint = FusionDistillModule.cache_fingerprint(SimpleNamespace(settings=s, tokenizer=tokenizer), data)
    loaders = data.predict_dataloader()
    loaders = loaders if isinstance(loaders, list) else [loaders]
    n = len(s.sources)
    items = []
    for kind, loader in zip(("labelled", "unlabeled"), loaders):
        for batch in loader:
            item = {"index": len(items), "kind": kind, "batch": batch}
            if kind == "labelled":
                item["selected"] = torch.arange(n).expand(len(batch["rows"]), n).contiguous()
            else:
                item["todo"] = [b for b, row in enumerate(batch["rows"]) if not is_labelled(row)]
            items.append(item)
    plan = plan_shards([len(item["batch"]["rows"]) for item in items], settings.shard_rows)
    keys = [[row_key(row) for j in shard for row in items[j]["batch"]["rows"]] for shard in plan]
    # Ray first: an address that does not answer stops the command before the directory is touched.
    handlers = saved_signal_handlers()
    started_ray = connect(ray, settings)
    try:
        kept = prepare_directory(s.cache_dir, fingerprint, keys, settings.fresh)
        result_phases = {"prepare": time.perf_counter() - started}
        result = Build(
            directory=s.cache_dir, rows=sum(len(k) for k in keys), shards=len(plan), reused=[shard_name(i) for i in sorted(kept)]
        )
        result.phases |= result_phases
        if kept:
            log(f"cache: {len(kept)} of {len(plan)} shards already written at {s.cache_dir} are kept (manifest and rows checked)")
        shard_of = {j: number for number, shard in enumerate(plan) for j in shard}
        for item in items:
            item["score"] = shard_of[item["index"]] not in kept

        writer = _ShardWriter(s.cache_dir, plan, len(tokenizer), kept, result, on_shard, log)
        top_k_routing = s.method.runs == "top_k" and bool(unlabeled)
        prefit = top_k_routing and s.selector_prefit_steps > 0
        labelled = [item for item in items if item["kind"] == "labelled"]
        answering = [item for item in items if item["kind"] == "unlabeled" and item["score"]]
        if not top_k_routing:  # the method's rule routes: here, before anything runs
            from fusion.stages.routing import Router

            router = Router(s, None, None)
            for item in answering:
                plan_answers(item, router.sources_for_answers(item["batch"], item["todo"])[0], tokenizer, s)

        common = {"settings": s, "student": student, "max_length": data.hparams.max_length, "threads": settings.threads}
        common |= {"gpus": settings.gpus_per_actor, "answers": settings.answers}
        resources = {"cpus": settings.cpus_per_actor, "gpus": settings.gpus_per_actor}
        student_actors = settings.student_actors or settings.actors_per_source

        def student_pool(selector: dict | None) -> Pool:
            kwargs = {"config": command.config, "selector": selector, "threads": settings.threads, "gpus": settings.gpus_per_actor}
            return Pool("student", StudentStage, kwargs, student_actors, **resources)

        def source_pools(role: str, sources: list[int]) -> list[Pool]:
            return [
                Pool(
                    f"{role} {s.source_names[i]}",
                    SourceStage,
                    {"index": i, "path": paths[i], "role": role, **common},
                    settings.actors_per_source,
                    **resources,
                )
                for i in sources
            ]

        def collect(stream: Iterator[dict]) -> list[dict]:
            done, begun, first = [], time.perf_counter(), None
            for item in stream:
                first = first or time.perf_counter()
                for name, seconds in item.get("busy", {}).items():
                    role, _, index = name.partition(" ")
                    name = f"{role} {s.source_names[int(index)]}" if index else role
                    result.busy[name] = result.busy.get(name, 0.0) + seconds
                if item["score"]:
                    writer.add(item["index"], assemble(item))
                done.append(item)
            if first is not None:
                result.phases["actors starting"] += first - begun
                result.phases["batches"] += time.perf_counter() - first
            return done

        # With the selector's prefit, two pipelines: the labelled rows (every source's CE there fits
        # the selector), then the prompts without gold; else one.
        writers = sorted({source for item in answering for source in item.get("asked", {})}) if not top_k_routing else list(range(n))

        def last_pools(selector: dict | None) -> list[Pool]:
            pools = [student_pool(selector)] if top_k_routing and answering else []
            return pools + (source_pools("answer", writers) if answering else []) + source_pools("score", list(range(n)))

        first_pools = [student_pool(None)] + source_pools("score", list(range(n)) if any(i["score"] for i in labelled) else [])
        for pools in ([first_pools] if prefit else []) + [last_pools(None)]:
            check_resources(ray, pools)  # before any work: every pipeline fits
        selector = None
        rest = [item for item in labelled if item["score"]] + answering
        if prefit:
            for item in labelled:
                item["features"] = True
            finished = sorted(collect(run_pipeline(ray, labelled, first_pools, settings)), key=lambda item: item["index"])
            fitting = time.perf_counter()
            selector = fit_selector(s, finished, writer.observations(finished, n))
            result.phases["prefit"] = time.perf_counter() - fitting
            rest = answering
        collect(run_pipeline(ray, rest, last_pools(selector), settings))
    finally:
        if started_ray:
            ray.shutdown()
            restore_signal_handlers(handlers)
    writer.check_complete()
    result.seconds = time.perf_counter() - started
    log(
        f"cache: {result.rows} rows in {result.shards} shards at {s.cache_dir} ({len(result.written)} written, {len(result.reused)} kept) "
        f"in {result.seconds:.1f} s: {result.rows_per_second:.1f} rows/s"
    )
    return result


def fit_selector(settings, labelled: list[dict], observations: list[tuple[torch.Tensor, torch.Tensor]]) -> dict | None:
    """The selector fitted on the labelled rows as `FusionDistillModule.prefit_selector` fits it
    (`Router.prefit` on `labelled_observations`' features, CE and validity, batch by batch in
    predict's order), from the weights the module starts with; None when the module's selector
    counts as fitted already (loaded from `model.init_from`)."""
    from fusion.objectives.selection import SourceSelector
    from fusion.stages.routing import Router

    if labelled[0]["prefitted"]:
        return None
    features = torch.cat([item["features"] for item in labelled])
    selector = SourceSelector(features.shape[1], len(settings.sources), settings.selector_hidden, settings.initial_quality)
    selector.load_state_dict(labelled[0]["selector_start"])
    router = Router(settings, selector, None)
    ce = torch.cat([router.observation(ce, item["batch"]["targets"]) for item, (ce, _) in zip(labelled, observations)])
    observed = torch.cat([valid for _, valid in observations])
    router.prefit(features, ce, observed)
    return {key: value.clone() for key, value in selector.state_dict().items()}


class _ShardWriter:
    """Writes each planned shard as soon as all its batches' records are in (`write_shard`)."""

    def __init__(self, directory, plan, vocab_size, kept, result: Build, on_shard, log):
        self.directory, self.plan, self.vocab_size, self.kept = directory, plan, vocab_size, kept
        self.result, self.on_shard, self.log = result, on_shard, log
        self.shard_of = {j: number for number, shard in enumerate(plan) for j in shard}
        self.records: dict[int, list[dict]] = {}
        self.by_batch: dict[int, list[dict]] = {}  # labelled batches' CE and validity, for the prefit

    def add(self, index: int, records: list[dict]) -> None:
        self.records[index] = records
        self.by_batch[index] = [{"ce": r["ce"], "valid": r["valid"]} for r in records]
        number = self.shard_of[index]
        batches = self.plan[number]
        if all(j in self.records for j in batches):
            rows = [record for j in batches for record in self.records.pop(j)]
            path = write_shard(self.directory, shard_name(number), rows, self.vocab_size)
            self.result.written.append(shard_name(number))
            self.log(
                f"cache: {shard_name(number)} written ({len(rows)} rows; {len(self.result.written) + len(self.kept)} of {len(self.plan)} shards)"
            )
            if self.on_shard is not None:
                self.on_shard(path)

    def observations(self, labelled: list[dict], n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every source's CE and validity [B, N] on each labelled batch: from this build's
        records, or from the kept shard that holds the batch."""
        from_disk: dict[str, dict] = {}
        for number in sorted(self.kept):
            table = _open_shard(os.path.join(self.directory, shard_name(number))).select_columns(["key", "ce", "valid"])
            from_disk |= {row["key"]: row for row in table}
        out = []
        for item in labelled:
            rows = self.by_batch.get(item["index"]) or [from_disk[row_key(row)] for row in item["batch"]["rows"]]
            out.append(
                (torch.tensor([r["ce"] for r in rows], dtype=torch.float32), torch.tensor([r["valid"] for r in rows], dtype=torch.bool))
            )
            if out[-1][0].shape[1] != n:
                raise RuntimeError(f"batch {item['index']}: {out[-1][0].shape[1]} sources' CE, expected {n}")
        return out

    def check_complete(self) -> None:
        missing = [shard_name(i) for i in range(len(self.plan)) if i not in self.kept and shard_name(i) not in self.result.written]
        if missing:
            raise RuntimeError(f"the pipeline ended with shards {missing} unwritten")


# ------------------------------------------------------------------------------------ the command


def main(argv: list[str] | None = None) -> Build:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        usage=f"{PROG} [--ray.OPTION VALUE ...] --config CONFIG [fusion.train predict arguments]",
    )
    defaults = RaySettings()
    options: dict[str, tuple[type, str]] = {
        "address": (str, "local (start Ray here), auto (this machine's cluster), host:port or ray://host:port"),
        "actors_per_source": (int, "actors in each source's answer and score pools"),
        "student_actors": (int, "actors of the student (prompt features, routing); default: --ray.actors_per_source"),
        "cpus_per_actor": (float, "Ray CPUs per actor (fractions allowed); torch uses its whole CPUs as threads"),
        "gpus_per_actor": (float, "Ray GPUs per actor (fractions allowed)"),
        "answers": (str, f"who writes the answers: {', '.join(ANSWER_BACKENDS)}"),
        "shard_rows": (int, "rows per shard, cut after a whole batch (predict's 4096 by default)"),
        "num_cpus": (int, "CPUs of the local Ray (--ray.address local); default: this machine's"),
        "object_store_memory": (int, "bytes of the local Ray's object store; default: Ray's"),
        "max_restarts": (int, "restarts of a dead actor, and retries of its batch"),
        "connect_timeout": (float, "seconds to wait for a cluster's address to answer"),
    }
    for name, (kind, text) in options.items():
        default = getattr(defaults, name)
        help_text = text if "default" in text else f"{text} (default {default})"
        parser.add_argument(f"--ray.{name}", dest=name, type=kind, default=default, metavar=kind.__name__.upper(), help=help_text)
    parser.add_argument(
        "--ray.fresh",
        dest="fresh",
        action="store_true",
        help="rebuild every shard (default: keep the complete shards of an interrupted build)",
    )
    arguments = sys.argv[1:] if argv is None else list(argv)
    args, predict_args = parser.parse_known_args(arguments)
    unknown = [a for a in predict_args if a.startswith("--ray.")]
    if unknown:
        parser.error(
            f"unknown option {unknown[0].split('=')[0]}; the --ray options are: {', '.join('--ray.' + n for n in [*options, 'fresh'])}"
        )
    if not predict_args:
        parser.error("pass the arguments `python -m fusion.train predict` runs with (at least --config)")
    return build_cache(predict_args, RaySettings(**vars(args)))


def command_line(argv: list[str] | None = None) -> Build:
    """`python -m fusion.cache_ray`: `main`, with bad input reported as `fusion.train` reports it:
    its one message first and last on stderr, exit code 2."""
    from fusion.train import EXIT_BAD_INPUT, USER_ERRORS, _headline, _report
    from fusion.train import fusion_error as raised_by_fusion

    try:
        return main(argv)
    except argparse.ArgumentError as error:
        _report(_headline(str(error)), f"{error}\n\n`{PROG} --help` lists every option.")
    except USER_ERRORS as error:
        cause = raised_by_fusion(error)
        if cause is None:
            raise
        _report(str(cause).strip(), "".join(traceback.format_exception(cause, chain=False)).rstrip())
    raise SystemExit(EXIT_BAD_INPUT)


if __name__ == "__main__":
    command_line()
