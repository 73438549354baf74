"""Export a fused student as a plain Hugging Face model directory (LoRA merged, safetensors).

    python -m fusion.export --ckpt_path checkpoints/quickstart/selector/version_0/checkpoints/last.ckpt \
        --output_dir checkpoints/export/selector

Tools outside `fusion` (lm-evaluation-harness, vLLM, ...) load a model directory's tokenizer
with `AutoTokenizer`, which for some model types (Qwen2 among them) replaces a generic saved
tokenizer by that family's own class: the embedded zoo's character tokenizer inside a Qwen2
directory would lose its spaces. When `AutoTokenizer` does not read the export's tokenizer back
as saved, the tokenizer is also written alone to `<output_dir>/tokenizer/`, where `AutoTokenizer`
reads it as saved; point such tools there (lm-eval: `tokenizer=<output_dir>/tokenizer`).
"""

from __future__ import annotations

import argparse
import os

import torch

from fusion.data.tokenizer import load_tokenizer
from fusion.stages.student import build_student
from fusion.utils.io import atomic_directory

TOKENIZER_SUBDIR = "tokenizer"
# Text that every tokenizer of the embedded suite splits into several tokens, spaces included.
_PROBE = "backward lemon= sort< cat, dog= reverse a, bb, ccc= 12+34= Hello world!"


def auto_tokenizer_matches(path: str, tokenizer, trust_remote_code: bool = False) -> bool:
    """Whether `AutoTokenizer.from_pretrained(path)` tokenizes as `tokenizer` does."""
    from transformers import AutoTokenizer

    try:
        auto = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception:  # a tokenizer AutoTokenizer cannot read at all does not match either
        return False
    ids = lambda t: t(_PROBE, add_special_tokens=False)["input_ids"]  # noqa: E731
    special = lambda t: (t.bos_token_id, t.eos_token_id, t.pad_token_id)  # noqa: E731
    return len(auto) == len(tokenizer) and ids(auto) == ids(tokenizer) and special(auto) == special(tokenizer)


def export(ckpt_path: str, output_dir: str) -> str:
    """Merge the checkpoint's LoRA adapter into the student's base and save both model and tokenizer
    (and the tokenizer alone in `tokenizer/` if `AutoTokenizer` would not read it back as saved)."""
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"--ckpt_path {ckpt_path!r} does not exist")
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    h = checkpoint["hyper_parameters"]
    base = checkpoint.get("base_model", h["student"])  # an SRFT run may sit on another model directory
    trust_remote_code = h.get("trust_remote_code", False)
    student = build_student(base, h["lora"], h.get("dtype", "float32"), trust_remote_code)
    adapter = {k.removeprefix("student."): v for k, v in checkpoint["state_dict"].items() if k.startswith("student.")}
    result = student.load_state_dict(adapter, strict=False)
    if result.unexpected_keys or not adapter:
        raise ValueError(f"{ckpt_path}: the adapter does not fit student {base!r} (unexpected {result.unexpected_keys[:3]})")
    merged = student.merge_and_unload()
    tokenizer = load_tokenizer(base, trust_remote_code)
    with atomic_directory(output_dir) as temporary:
        merged.save_pretrained(temporary, safe_serialization=True)
        tokenizer.save_pretrained(temporary)
        if not auto_tokenizer_matches(temporary, tokenizer, trust_remote_code):
            tokenizer.save_pretrained(os.path.join(temporary, TOKENIZER_SUBDIR))
            if not auto_tokenizer_matches(os.path.join(temporary, TOKENIZER_SUBDIR), tokenizer, trust_remote_code):
                raise ValueError(
                    f"student {base!r}: AutoTokenizer does not read its tokenizer back as saved, even alone; "
                    "tools that load the export with AutoTokenizer would tokenize it differently"
                )
    return output_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_path", required=True, help="a fusion checkpoint (.ckpt)")
    parser.add_argument("--output_dir", required=True, help="directory for the merged Hugging Face model")
    args = parser.parse_args(argv)
    out = export(args.ckpt_path, args.output_dir)
    print(out)
    if os.path.isdir(os.path.join(out, TOKENIZER_SUBDIR)):
        print(
            f"AutoTokenizer would not read {out}'s tokenizer as saved; tools that use it should load "
            f"{os.path.join(out, TOKENIZER_SUBDIR)} (lm-eval: --model_args pretrained={out},tokenizer={os.path.join(out, TOKENIZER_SUBDIR)})"
        )


if __name__ == "__main__":
    main()
