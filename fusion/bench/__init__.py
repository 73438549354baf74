"""Benchmarks: `python -m fusion.bench NAME [options]`.

Each benchmark is a module `fusion.bench.NAME` with a `main(argv)` function. Speed and memory
figures are printed as ratios measured side by side in one run, never asserted in tests.
"""
