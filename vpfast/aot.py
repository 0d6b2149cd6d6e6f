"""Ahead-of-time compile of every GPU kernel for real GPUs, on a machine without one.

Each Triton launch that the launchers build (``aot_cases()`` in each kernel file) is
compiled for sm_80 and sm_90 with the specialization Triton's JIT would give it
(dtypes, constexprs, divisibility and alignment of its arguments); the cubin is read
with the ``cuobjdump`` that ships inside Triton: registers, shared, local and stack
memory, and the widths of the global loads and stores in the SASS. The CUDA
extension's kernels are read the same way from the built library.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

ARCHS = (80, 90)
REGISTERS_PER_SM = 65536

_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_ACCESS = re.compile(r"\b(LDG|STG)\.E((?:\.[A-Z0-9_]+)*)")
_WIDTHS = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128}


@dataclasses.dataclass
class KernelReport:
    """What one kernel specialization needs on one target, and how it touches global memory."""

    case: str
    kernel: str
    arch: int
    num_warps: int
    registers: int
    stack: int
    shared: int
    local: int
    loads: dict[int, int]  # access width in bits -> number of SASS instructions
    stores: dict[int, int]
    register_budget: int | None = None  # per thread, from the occupancy the launcher assumes
    min_store_bits: int | None = None
    min_load_bits: int | None = None

    def problems(self) -> list[str]:
        """The reasons this kernel fails the tier: spills, registers over budget, narrow accesses."""
        found = []
        if self.stack or self.local:
            found.append(f"spills: stack {self.stack} B, local {self.local} B")
        if self.register_budget is not None and self.registers > self.register_budget:
            found.append(f"{self.registers} registers > budget {self.register_budget}")
        if self.min_store_bits and (not self.stores or min(self.stores) < self.min_store_bits):
            found.append(f"stores {self.stores} narrower than {self.min_store_bits} bits")
        if self.min_load_bits and (not self.loads or max(self.loads) < self.min_load_bits):
            found.append(f"no {self.min_load_bits}-bit loads: {self.loads}")
        return found


@functools.cache
def cuobjdump() -> str:
    """The cuobjdump that ships inside Triton's package."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise FileNotFoundError(f"no cuobjdump at {path}: this Triton build does not ship one")
    return str(path)


def _run_cuobjdump(flag: str, path: str) -> str:
    return subprocess.run([cuobjdump(), flag, path], capture_output=True, text=True, check=True).stdout


def access_widths(sass: str) -> tuple[dict[int, int], dict[int, int]]:
    """Counts of global loads and stores by width in bits (plain ``LDG.E`` is 32 bits)."""
    counts: dict[str, Counter] = {"LDG": Counter(), "STG": Counter()}
    for op, suffix in _ACCESS.findall(sass):
        widths = [_WIDTHS[s] for s in suffix.split(".") if s in _WIDTHS]
        counts[op][widths[0] if widths else 32] += 1
    return dict(counts["LDG"]), dict(counts["STG"])


def compile_launch(launch, arch: int):
    """Compile a launch for ``sm_<arch>`` with the specialization Triton's JIT would choose."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.constexprs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, dict(launch.constexprs), bound,
                                                              specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def report_cubin(cubin: bytes) -> tuple[tuple[int, int, int, int], str]:
    """((registers, stack, shared, local), SASS) of a single-kernel cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        Path(path).write_bytes(cubin)
        resources = _RESOURCES.search(_run_cuobjdump("--dump-resource-usage", path))
        sass = _run_cuobjdump("--dump-sass", path)
    if resources is None:
        raise RuntimeError("cuobjdump printed no resource usage for the cubin")
    return tuple(int(v) for v in resources.groups()), sass


def triton_cases(arch: int) -> list:
    """Every AotCase of every kernel file for ``sm_<arch>``, as its launchers build them."""
    from vpfast.ops import kernel_modules

    return [case for module in kernel_modules("triton") for case in importlib.import_module(module).aot_cases(arch)]


def _register_budget(num_warps: int, programs_per_sm: int) -> int:
    return min(255, REGISTERS_PER_SM // (programs_per_sm * num_warps * 32))


def compile_case(case, arch: int) -> KernelReport:
    """Compile one case for one target and read its resources and memory accesses."""
    from vpfast.kernels import compose

    compiled = compile_launch(case.launch, arch)
    (registers, stack, shared, local), sass = report_cubin(compiled.asm["cubin"])
    loads, stores = access_widths(sass)
    num_warps = case.launch.constexprs.get("num_warps", 4)
    return KernelReport(
        case=case.name, kernel=case.launch.kernel.fn.__name__, arch=arch, num_warps=num_warps,
        registers=registers, stack=stack, shared=shared, local=local, loads=loads, stores=stores,
        register_budget=_register_budget(num_warps, compose.PROGRAMS_PER_SM),
        min_store_bits=case.min_store_bits, min_load_bits=case.min_load_bits,
    )


def extension_reports() -> list[KernelReport]:
    """Resource usage of the CUDA kernels inside the built ``vpfast._C`` (empty without CUDA kernels)."""
    spec = importlib.util.find_spec("vpfast._C")
    if spec is None or spec.origin is None:
        return []
    text = _run_cuobjdump("--dump-resource-usage", spec.origin)
    reports, arch = [], 0
    for line in text.splitlines():
        if m := re.search(r"arch = sm_(\d+)", line):
            arch = int(m.group(1))
        elif m := re.search(r"Function (\S+):", line):
            name = m.group(1)
        elif m := _RESOURCES.search(line):
            registers, stack, shared, local = (int(v) for v in m.groups())
            reports.append(KernelReport(case="vpfast._C", kernel=_demangle(name), arch=arch, num_warps=0,
                                        registers=registers, stack=stack, shared=shared, local=local, loads={},
                                        stores={}))
    return reports


def _demangle(name: str) -> str:
    """A readable kernel name (c++filt, without the parameter list), or the mangled one without c++filt."""
    try:
        done = subprocess.run(["c++filt", name], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return name
    return done.stdout.strip().split("(")[0]


def run(archs: tuple[int, ...] = ARCHS, progress: bool = True) -> list[KernelReport]:
    """Compile every Triton case for every target, then read the extension's kernels."""
    from tqdm import tqdm
    from triton import knobs

    if knobs.runtime.interpret:
        raise RuntimeError("the ahead-of-time compile needs real Triton kernels: unset TRITON_INTERPRET")
    jobs = [(case, arch) for arch in archs for case in triton_cases(arch)]
    reports = [compile_case(case, arch) for case, arch in tqdm(jobs, desc="aot compile", disable=not progress)]
    return reports + extension_reports()


def format_table(reports: list[KernelReport]) -> str:
    """A fixed-width table: one row per kernel, specialization and target."""

    def widths(counts: dict[int, int]) -> str:
        return " ".join(f"{bits}b:{n}" for bits, n in sorted(counts.items())) or "-"

    header = f"{'case':40} {'kernel':40} {'sm':>3} {'regs':>4} {'stack':>5} {'smem':>6} {'loads':24} {'stores':12} ok"
    rows = [header, "-" * len(header)]
    for r in reports:
        problems = r.problems()
        rows.append(f"{r.case[:40]:40} {r.kernel[-40:]:40} {r.arch:>3} {r.registers:>4} {r.stack:>5} {r.shared:>6} "
                    f"{widths(r.loads)[:24]:24} {widths(r.stores)[:12]:12} {'; '.join(problems) or 'yes'}")
    return "\n".join(rows)


def to_json(reports: list[KernelReport]) -> dict:
    import torch
    import triton

    return {"triton": triton.__version__, "torch": torch.__version__,
            "kernels": [dataclasses.asdict(r) | {"problems": r.problems()} for r in reports]}


def write_json(reports: list[KernelReport], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(reports), indent=1) + "\n")
    return path
