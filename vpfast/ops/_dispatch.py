"""Backend choice per call: which implementation of an op runs for a given device.

CUDA tensors take the fused kernels, CPU tensors the reference (the spec).
``VPFAST_BACKEND=reference|triton|cuda`` forces one backend for every op that
has it; forcing ``triton`` on CPU tensors runs the kernels under
``TRITON_INTERPRET=1``. A fast path that cannot run warns once and falls back
to the reference; ``vpfast info`` shows what each op will use.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

BACKENDS = ("reference", "triton", "cuda")

# op name -> device type -> fast backends in order of preference.
OP_BACKENDS: dict[str, dict[str, tuple[str, ...]]] = {}

_warned: set[str] = set()


def register_op(name: str, fast: dict[str, tuple[str, ...]]) -> None:
    """Declare the fast backends an op has per device type (the reference always exists)."""
    OP_BACKENDS[name] = fast


def warn_once(key: str, message: str) -> None:
    """Emit ``message`` as a RuntimeWarning the first time ``key`` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def forced_backend() -> str | None:
    """The backend named by ``VPFAST_BACKEND``, or None when it is unset."""
    value = os.environ.get("VPFAST_BACKEND", "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"VPFAST_BACKEND must be one of {BACKENDS}, got {value!r}")
    return value


@functools.cache
def triton_status() -> tuple[bool, str]:
    """Whether Triton imports, and its version or the import error."""
    try:
        import triton
    except Exception as exc:  # noqa: BLE001 - any import failure means no Triton
        return False, f"triton unavailable: {exc}"
    return True, triton.__version__


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_available(backend: str, device_type: str) -> tuple[bool, str]:
    """Whether ``backend`` can run on ``device_type`` here, and why not."""
    if backend == "reference":
        return True, ""
    if backend == "triton":
        ok, why = triton_status()
        if not ok:
            return False, why
        if device_type == "cuda" or (device_type == "cpu" and interpreter_enabled()):
            return True, ""
        return False, f"Triton runs {device_type} tensors only under TRITON_INTERPRET=1"
    if backend == "cuda":
        from vpfast import _extension

        status = _extension.status()
        if not status.loaded:
            return False, status.reason
        if device_type == "cuda" and not status.has_cuda:
            return False, "vpfast._C was built without CUDA kernels"
        return True, ""
    raise ValueError(f"unknown backend {backend!r}")


def _all_backends(op: str) -> tuple[str, ...]:
    """The fast backends ``op`` has on any device (forcing one runs it where it can run, e.g. Triton
    on CPU tensors under the interpreter)."""
    return tuple(dict.fromkeys(b for fast in OP_BACKENDS[op].values() for b in fast))


def choose(op: str, device: torch.device) -> str:
    """The backend that ``op`` runs for tensors on ``device`` (warns once on a fallback)."""
    fast = OP_BACKENDS[op].get(device.type, ())
    forced = forced_backend()
    if forced is not None:
        if forced == "reference":
            return forced
        if forced not in _all_backends(op):
            raise RuntimeError(f"VPFAST_BACKEND={forced}, but {op} has no {forced} backend "
                               f"(it has {('reference', *_all_backends(op))})")
        ok, why = backend_available(forced, device.type)
        if not ok:
            raise RuntimeError(f"VPFAST_BACKEND={forced} cannot run {op} on {device.type}: {why}")
        return forced
    for backend in fast:
        ok, why = backend_available(backend, device.type)
        if ok:
            return backend
        warn_once(
            f"{op}:{device.type}:{backend}",
            f"vpfast: {op} falls back to the reference on {device.type} ({backend} unavailable: {why})",
        )
    return "reference"


def backend_table() -> dict[str, dict[str, str]]:
    """For ``vpfast info``: the backend each registered op uses per device type, without warning."""
    table: dict[str, dict[str, str]] = {}
    forced = forced_backend()
    for op, fast in OP_BACKENDS.items():
        row = {}
        for device_type in ("cpu", "cuda"):
            if forced is not None:
                ok, why = backend_available(forced, device_type)
                if forced not in ("reference", *_all_backends(op)):
                    ok, why = False, f"{op} has no {forced} backend"
                row[device_type] = forced if ok else f"error: {why}"
                continue
            chosen, notes = "reference", []
            for backend in fast.get(device_type, ()):
                ok, why = backend_available(backend, device_type)
                if ok:
                    chosen = backend
                    break
                notes.append(f"{backend} unavailable: {why}")
            row[device_type] = chosen + (f" ({'; '.join(notes)})" if notes else "")
        table[op] = row
    return table
