"""Lightning callbacks that the configs name."""

from __future__ import annotations

import lightning as L
import torch


class TorchThreads(L.Callback):
    """Set torch's intra-op threads when a run starts (`torch.set_num_threads`).

    Rollout sampling with a tiny model is many small, latency-bound operations: on a shared
    CPU, more threads than free cores makes them wait on each other (measured on this 2-core
    machine under load: about 1 s a step with one thread, 5-30 s with two).
    """

    def __init__(self, num_threads: int = 1):
        if num_threads < 1:
            raise ValueError(f"TorchThreads: num_threads must be at least 1, got {num_threads}")
        self.num_threads = num_threads

    def setup(self, trainer, pl_module, stage: str) -> None:
        torch.set_num_threads(self.num_threads)
