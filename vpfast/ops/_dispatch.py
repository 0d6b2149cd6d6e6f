"""Backend selection: which implementation of an op runs for a device and dtype, for calls and ``vpfast info``.

Each op registers its backends in order of preference, the reference (the spec) last. A backend
declares the device types it is chosen on by default, the dtypes it takes and, through ``runs_on``,
why it cannot run on a device here (Triton missing, the extension not loaded). :func:`select` picks the
first one that can run; a preferred backend that cannot run warns once and shows in ``vpfast info``
(:func:`backend_table`, the same selection). A backend may also refuse single calls (``supports``: sizes or
options its kernels do not handle); such a call runs the next backend, with a one-time warning.
``VPFAST_BACKEND=reference|triton|cpp|cuda`` forces one backend for every op that has it, and raises
where it cannot run (or take the call); forcing ``triton`` on CPU tensors runs the kernels under
``TRITON_INTERPRET=1``. Both variables are read when vpfast is imported (:func:`read_environment` reads
them again, e.g. after a test sets them): a selection per call costs a dict lookup, not an environment read.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vpfast import _extension
from vpfast._warn import warn_once

BACKENDS = ("reference", "triton", "cpp", "cuda")
DEVICE_TYPES = ("cpu", "cuda")


def _runs_anywhere(device_type: str) -> str:
    return ""


@dataclass(frozen=True)
class Backend:
    """One implementation of an op: where it is chosen by default, the dtypes it takes, its kernels.

    ``forward`` and ``backward`` take the op's (and its backward op's) tensors, then its options.
    ``runs_on(device_type)`` says why it cannot run on that device type here ("" when it can).
    ``modules``: the kernel files it launches (for the ahead-of-time compile and the tests' poisoning).
    ``supports(tensors, options)`` says why it cannot take one call's arguments ("" when it can); None: it takes
    every call the op accepts. ``limits`` says the same in words, for ``vpfast info``.
    """

    name: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    forward: Callable
    backward: Callable
    runs_on: Callable[[str], str] = _runs_anywhere
    modules: tuple[str, ...] = ()
    supports: Callable[[tuple, tuple], str] | None = None
    limits: str = ""

    def why_not(self, device_type: str, dtype: torch.dtype) -> str:
        """Why this backend cannot run ``dtype`` tensors on ``device_type`` here, or ""."""
        if dtype not in self.dtypes:
            return f"{self.name} takes {', '.join(_dtype_name(d) for d in self.dtypes)}"
        return self.runs_on(device_type)


OPS: dict[str, tuple[Backend, ...]] = {}


def register(op: str, backends: tuple[Backend, ...]) -> None:
    """Declare ``op``'s backends in order of preference; the last must be the reference."""
    if backends[-1].name != "reference" or backends[-1].devices != DEVICE_TYPES or backends[-1].supports is not None:
        raise ValueError(f"{op}: the last backend must be the reference, chosen on {DEVICE_TYPES}, taking every call")
    OPS[op] = backends


def kernel_modules(backend: str) -> tuple[str, ...]:
    """The kernel files of every op's ``backend`` backend, e.g. the Triton ones for the AOT compile."""
    return tuple(m for backends in OPS.values() for b in backends if b.name == backend for m in b.modules)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def forced_backend() -> str | None:
    """The backend named by ``VPFAST_BACKEND`` (as last read), or None when it is unset."""
    value = (_environment["VPFAST_BACKEND"] or "").strip().lower()
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
    """Whether ``TRITON_INTERPRET=1`` (as last read): Triton then runs CPU tensors in its interpreter."""
    return _environment["TRITON_INTERPRET"] == "1"


@functools.cache
def interpreter_problem() -> str:
    """Why Triton's interpreter cannot run vpfast's kernels with this Triton and numpy ("" when it can).

    Before Triton 3.7 the interpreter turns a one-element array into a Python int for ``tl.range`` bounds
    such as ``tl.program_id``, which numpy 2.4 refuses (triton-lang/triton#9171).
    """
    import numpy
    import triton
    from torch.torch_version import TorchVersion

    if TorchVersion(triton.__version__) < (3, 7) and TorchVersion(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter cannot run these kernels with numpy {numpy.__version__} "
                "(triton-lang/triton#9171): use Triton >= 3.7 or numpy < 2.4")
    return ""


def triton_runs_on(device_type: str) -> str:
    """Why the Triton kernels cannot run on ``device_type`` here ("" when they can)."""
    ok, why = triton_status()
    if not ok:
        return why
    if device_type == "cuda":
        return ""
    if device_type == "cpu" and interpreter_enabled():
        return interpreter_problem()
    return f"Triton runs {device_type} tensors only under TRITON_INTERPRET=1"


def extension_runs_on(kernel_device: str) -> Callable[[str], str]:
    """``runs_on`` of the extension's kernels for ``kernel_device`` tensors ("cpu" or "cuda")."""

    def runs_on(device_type: str) -> str:
        if device_type != kernel_device:
            return f"vpfast._C's {kernel_device} kernels take {kernel_device} tensors"
        status = _extension.status()
        if not status.loaded:
            return status.reason
        if kernel_device == "cuda" and not status.has_cuda:
            return "vpfast._C was built without CUDA kernels"
        return ""

    return runs_on


class BackendError(RuntimeError):
    """VPFAST_BACKEND names a backend that cannot run the call; ``why`` is the reason alone."""

    def __init__(self, message: str, why: str):
        super().__init__(message)
        self.why = why


def _select(op: str, device_type: str, dtype: torch.dtype, forced: str | None) -> tuple[Backend, str]:
    """(backend, why the preferred ones were skipped) with ``VPFAST_BACKEND=forced``, as of now."""
    backends = OPS[op]
    if forced is not None:
        by_name = {b.name: b for b in backends}
        if forced not in by_name:
            why = f"{op} has no {forced} backend (it has {tuple(by_name)})"
            raise BackendError(f"VPFAST_BACKEND={forced}, but {why}", why)
        why = by_name[forced].why_not(device_type, dtype)
        if why:
            raise BackendError(f"VPFAST_BACKEND={forced} cannot run {op} on {device_type} with "
                               f"{_dtype_name(dtype)}: {why}", why)
        return by_name[forced], ""
    notes = []
    for backend in backends:
        if device_type in backend.devices:
            why = backend.why_not(device_type, dtype)
            if not why:
                return backend, "; ".join(notes)
            notes.append(f"{backend.name} unavailable: {why}")
    raise AssertionError("unreachable: the reference runs everywhere")


# (op, device, dtype) -> (backend, notes, the extension status it saw), for the environment as last read
_chosen: dict[tuple, tuple[Backend, str, _extension.ExtensionStatus]] = {}
ENV_VARS = ("TRITON_INTERPRET", "VPFAST_BACKEND")
_environment: dict[str, str | None] = {}


def read_environment() -> None:
    """Read ``VPFAST_BACKEND`` and ``TRITON_INTERPRET`` from the process environment; the selection follows them.

    vpfast reads them once, when it is imported: call this after changing them in a running process.
    """
    _environment.update({name: os.environ.get(name) for name in ENV_VARS})
    _chosen.clear()


def environment() -> dict[str, str | None]:
    """The values of ``VPFAST_BACKEND`` and ``TRITON_INTERPRET`` in force (None: unset), for ``vpfast info``."""
    return dict(_environment)


read_environment()


def select(op: str, device: torch.device, dtype: torch.dtype, tensors: tuple = (), options: tuple = ()) -> Backend:
    """The backend ``op`` runs for ``dtype`` tensors on ``device``; warns once when it is a fallback.

    Runs on every call: the choice is cached per (op, device, dtype) for the environment as last read
    (:func:`read_environment`). A backend that cannot take the call's ``tensors`` and ``options`` (its ``supports``)
    raises when forced, else the next backend that can runs, with a one-time warning.
    """
    key = (op, device, dtype)  # the device: .type costs more
    entry = _chosen.get(key)
    if entry is None or entry[2] is not _extension.status():  # a reloaded extension status invalidates the choice
        entry = (*_select(op, device.type, dtype, forced_backend()), _extension.status())
        _chosen[key] = entry
    if entry[1]:
        warn_once(f"{op}:{device.type}:{dtype}", f"vpfast: {op} with {_dtype_name(dtype)} {device.type} tensors "
                                                 f"runs the {entry[0].name} backend ({entry[1]})")
    backend = entry[0]
    if backend.supports is not None and tensors:  # no tensors (choose): the backend for the device and dtype
        why = backend.supports(tensors, options)
        if why:
            return _fall_back(op, backend, why, forced_backend(), device.type, dtype, tensors, options)
    return backend


def _fall_back(op: str, backend: Backend, why: str, forced: str | None, device_type: str, dtype: torch.dtype,
               tensors: tuple, options: tuple) -> Backend:
    """The backend after ``backend`` that takes this call, since ``backend`` cannot (``why``); raises when forced."""
    if forced is not None:
        raise BackendError(f"VPFAST_BACKEND={backend.name} cannot run this {op} call: {why}", why)
    backends = OPS[op]
    for other in backends[backends.index(backend) + 1:]:
        if device_type in other.devices and not other.why_not(device_type, dtype) \
                and not (other.supports is not None and other.supports(tensors, options)):
            warn_once(f"{op}:{backend.name}:{why}", f"vpfast: {op} runs the {other.name} backend for a call that the "
                                                    f"{backend.name} backend cannot take: {why}")
            return other
    raise AssertionError("unreachable: the reference takes every call")


def choose(op: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The name of the backend ``op`` runs for ``dtype`` tensors on ``device``."""
    return select(op, device, dtype).name


def describe(op: str, device_type: str) -> str:
    """What ``op`` runs on ``device_type`` for each dtype it takes, as ``vpfast info`` shows it (no warning)."""
    groups: dict[str, list[str]] = {}
    for dtype in OPS[op][-1].dtypes:
        try:
            backend, notes = _select(op, device_type, dtype, forced_backend())
            entry = backend.name + (f" ({notes})" if notes else "") + (f" [{backend.limits}]" if backend.limits else "")
        except BackendError as exc:
            entry = f"error: {exc.why}"
        groups.setdefault(entry, []).append(_dtype_name(dtype))
    if len(groups) == 1:
        return next(iter(groups))
    return "; ".join(f"{', '.join(dtypes)}: {entry}" for entry, dtypes in groups.items())


def backend_table() -> dict[str, dict[str, str]]:
    """For ``vpfast info``: per op and device type, the backend for each dtype."""
    return {op: {device_type: describe(op, device_type) for device_type in DEVICE_TYPES} for op in OPS}
