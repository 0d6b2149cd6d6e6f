"""Progress output that suits where it goes: a tqdm bar on a terminal, plain periodic lines in a log file.

A carriage-return bar written to a CI log or through ``| tee`` becomes hundreds of lines, so when stderr is not
a terminal the training loop prints one line every ``PLAIN_EVERY_S`` seconds and at the end of each epoch.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable

from tqdm import tqdm

PLAIN_EVERY_S = 30.0


def on_terminal() -> bool:
    return sys.stderr.isatty()


def say(line: str, enabled: bool = True) -> None:
    """One line of progress on stderr (stdout carries the results)."""
    if enabled:
        print(line, file=sys.stderr, flush=True)


def bar(iterable: Iterable, total: int, desc: str, enabled: bool) -> Iterable:
    """A transient bar for evaluation loops on a terminal; nothing elsewhere."""
    return tqdm(iterable, total=total, desc=desc, leave=False, disable=not (enabled and on_terminal()))


class EpochProgress:
    """Steps of one training epoch: ``step(loss)`` after each optimizer step, ``close()`` at the end."""

    def __init__(self, desc: str, total: int, initial: int, enabled: bool) -> None:
        self.desc, self.total, self.done, self.enabled = desc, total, initial, enabled
        self.bar = tqdm(total=total, initial=initial, desc=desc, leave=False) if enabled and on_terminal() else None
        self.loss: float | None = None
        self.last_line, self.printed = time.monotonic(), initial

    def step(self, loss: float | None = None) -> None:
        self.done += 1
        self.loss = self.loss if loss is None else loss
        if self.bar is not None:
            self.bar.update()
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}")
        elif self.enabled and time.monotonic() - self.last_line >= PLAIN_EVERY_S:
            self._line()

    def _line(self) -> None:
        loss = "" if self.loss is None else f", loss {self.loss:.4f}"
        say(f"{self.desc}: step {self.done}/{self.total}{loss}")
        self.last_line, self.printed = time.monotonic(), self.done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.printed != self.done:
            self._line()
