"""What every launcher shares with the ahead-of-time tier: a launch, and a case to compile."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


class Launch(NamedTuple):
    """One kernel launch: the kernel, its grid, runtime arguments and compile-time constants.

    Launchers build these and run them; the ahead-of-time tier compiles the very same
    objects, so the specializations it checks are the ones that run.
    """

    kernel: object
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict

    def run(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs)


class LoopDesign(NamedTuple):
    """One loop over the batch as designed, per thread per iteration: the output elements it computes, the
    global loads + stores it issues (only those ``bits`` wide when given), the SASS instructions per output
    element allowed, and the trip count of any loop inside it (rolled loops over bilinear corners; 1: none)."""

    outputs: int
    accesses: int
    budget: float
    inner_trips: int = 1
    bits: int | None = None


@dataclass
class AotCase:
    """A launch to compile for real GPUs, and the memory-access widths its contiguous paths must reach.

    ``min_store_bits``: every global store is at least this wide; ``min_load_bits``: the widest
    global load is at least this wide (other loads may be narrower gathers). None: no claim.
    ``sass_paths``: the kernel's loops over the batch, named from the longest body to the shortest
    (aot.py, ``sass_per_output``).
    """

    name: str
    launch: Launch
    min_store_bits: int | None = None
    min_load_bits: int | None = None
    notes: str = field(default="")
    sass_paths: dict[str, LoopDesign] | None = None
