"""Load the compiled extension ``vpfast._C`` after checking it was built for the running torch.

Importing ``vpfast._C`` registers its kernels in the ``vpfast`` namespace. setup.py records what it
built in ``vpfast/_build_info.json``; that record is checked *before* the import, because a binary
built for another torch or CUDA can fail in obscure ways once loaded. Any problem (not built,
mismatch, import error) warns once and leaves the ops on their Triton/reference backends: importing
vpfast never fails because of the extension. The extension only provides kernels: the ops' schemas,
fakes, autograd and backend selection are in ``vpfast/ops``, which imports this module (not the reverse).
"""

from __future__ import annotations

import functools
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vpfast._warn import warn_once

BUILD_INFO_PATH = Path(__file__).with_name("_build_info.json")
HAS_CUDA_KERNELS = 1  # bit in vpfast::_extension_info(), see csrc/vpfast.cpp


@dataclass(frozen=True)
class ExtensionStatus:
    """Whether ``vpfast._C`` is loaded, whether it has CUDA kernels, and why not."""

    loaded: bool
    has_cuda: bool
    reason: str  # "" when loaded
    build_info: dict = field(default_factory=dict)


def read_build_info(path: Path = BUILD_INFO_PATH) -> dict:
    """The metadata setup.py wrote at build time, or {} when there is none (a plain source checkout)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def check_build_info(
    info: dict, torch_version: str = torch.__version__, torch_cuda: str | None = torch.version.cuda
) -> str:
    """Why the build described by ``info`` cannot be loaded into this torch, or "" if it can.

    A stable-ABI build loads into any torch at least as new as its target; any other build needs
    the torch major.minor it was built with. CUDA kernels need a CUDA torch of the same CUDA major
    version (the CUDA runtime's library name carries the major version). The defaults describe the
    running torch; ``torch_cuda=None`` is a CPU-only torch.
    """
    if not info.get("extension"):
        return "vpfast was built without the compiled extension (VPFAST_SKIP_EXT=1)"
    running = _major_minor(torch_version)
    if info.get("abi") == "stable":
        target = _major_minor(info["torch_target"])
        if running < target:
            return (
                f"vpfast._C needs torch >= {info['torch_target']} (stable ABI), running torch {torch_version}"
            )
    elif running != _major_minor(info["torch"]):
        return f"vpfast._C was built for torch {info['torch']}, running torch {torch_version}"
    if info.get("cuda_kernels"):
        built_cuda = info.get("torch_cuda")
        if torch_cuda is None:
            return f"vpfast._C has CUDA {built_cuda} kernels but torch {torch_version} is a CPU-only build"
        if built_cuda and built_cuda.split(".")[0] != torch_cuda.split(".")[0]:
            return f"vpfast._C was built for CUDA {built_cuda}, running torch is built for CUDA {torch_cuda}"
    return ""


def load(info: dict) -> ExtensionStatus:
    """Check ``info`` and import ``vpfast._C`` if it fits; never raises, never warns."""
    if info:
        reason = check_build_info(info)
        if reason:
            hint = "; rebuild with pip install --no-build-isolation -e ."
            return ExtensionStatus(False, False, reason + hint, info)
    try:
        importlib.import_module("vpfast._C")
        flags = torch.ops.vpfast._extension_info()
    except Exception as exc:  # any failure to load means "no extension"
        what = "not built" if isinstance(exc, ModuleNotFoundError) else "failed to load"
        return ExtensionStatus(False, False, f"vpfast._C {what}: {exc}", info)
    return ExtensionStatus(True, bool(flags & HAS_CUDA_KERNELS), "", info)


@functools.cache
def status() -> ExtensionStatus:
    """Load the extension once per process; warn once if it is unavailable."""
    result = load(read_build_info())
    if not result.loaded:
        warn_once(
            "extension",
            f"vpfast: compiled extension not loaded, ops use their Triton and reference backends: "
            f"{result.reason}",
        )
    return result
