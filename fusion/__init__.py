"""fusion: distil several source LLMs into one LoRA student with adaptive source selection."""

__version__ = "0.1.0"
