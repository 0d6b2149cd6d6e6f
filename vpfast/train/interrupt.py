"""SIGINT and SIGTERM as a request to stop at the next safe point, so that training can save and exit cleanly.

While ``StopSignals`` is active (the main thread only: Python delivers signals there), the first SIGINT or
SIGTERM is recorded instead of raising ``KeyboardInterrupt`` or killing the process; the training loop polls
``requested()`` after each optimizer step and each validation batch. Under DistributedDataParallel the
request is all-reduced, so every rank stops at the same step.
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT or SIGTERM after saving; ``str(exc)`` is the one line to show the user
    (where it stopped, what was saved, the command that continues) and ``exit_code`` is 130 or 143."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """Context manager recording SIGINT/SIGTERM; ``requested()`` is the signal number (agreed by all ranks) or 0."""

    def __init__(self, device: torch.device, distributed: bool) -> None:
        self.device, self.distributed = device, distributed
        self.received = 0
        self._previous: dict[int, object] = {}

    def _record(self, signum: int, frame) -> None:
        self.received = self.received or signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in EXIT_CODES:
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def requested(self) -> int:
        if not self.distributed:
            return self.received
        flag = torch.tensor([self.received], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag)

    @staticmethod
    def name(signum: int) -> str:
        return signal.Signals(signum).name
