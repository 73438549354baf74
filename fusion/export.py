"""Export a fused student as a plain Hugging Face model directory (LoRA merged, safetensors).

    python -m fusion.export --ckpt_path checkpoints/quickstart/selector/version_0/checkpoints/last.ckpt \
        --output_dir checkpoints/export/selector
"""

from __future__ import annotations

import argparse
import os

import torch

from fusion.io import atomic_directory
from fusion.student import build_student
from fusion.tokenizer import load_tokenizer


def export(ckpt_path: str, output_dir: str) -> str:
    """Merge the checkpoint's LoRA adapter into the student's base and save both model and tokenizer."""
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"--ckpt_path {ckpt_path!r} does not exist")
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    h = checkpoint["hyper_parameters"]
    base = checkpoint.get("base_model", h["student"])  # an SRFT run may sit on another model directory
    student = build_student(base, h["lora"], h.get("dtype", "float32"), h.get("trust_remote_code", False))
    adapter = {k.removeprefix("student."): v for k, v in checkpoint["state_dict"].items() if k.startswith("student.")}
    result = student.load_state_dict(adapter, strict=False)
    if result.unexpected_keys or not adapter:
        raise ValueError(f"{ckpt_path}: the adapter does not fit student {base!r} (unexpected {result.unexpected_keys[:3]})")
    merged = student.merge_and_unload()
    with atomic_directory(output_dir) as temporary:
        merged.save_pretrained(temporary, safe_serialization=True)
        load_tokenizer(base, h.get("trust_remote_code", False)).save_pretrained(temporary)
    return output_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_path", required=True, help="a fusion checkpoint (.ckpt)")
    parser.add_argument("--output_dir", required=True, help="directory for the merged Hugging Face model")
    args = parser.parse_args(argv)
    print(export(args.ckpt_path, args.output_dir))


if __name__ == "__main__":
    main()
