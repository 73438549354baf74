"""`python -m fusion.bench NAME [options]` runs the benchmark module `fusion.bench.NAME`."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import fusion.bench


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(fusion.bench.__path__) if not m.name.startswith("_"))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    names = available()
    if not argv or argv[0] not in names:
        sys.exit(f"usage: python -m fusion.bench {{{','.join(names)}}} [options]")
    import datasets
    from transformers.utils.logging import disable_progress_bar

    disable_progress_bar()  # weight loading and saving bars; each benchmark prints its own table
    datasets.disable_progress_bars()
    importlib.import_module(f"fusion.bench.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    main()
