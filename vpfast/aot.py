"""Ahead-of-time compile of every GPU kernel for real GPUs, on a machine without one.

Each Triton launch that the launchers build (``aot_cases()`` in each kernel file) is
compiled for sm_80 and sm_90 with the specialization Triton's JIT would give it
(dtypes, constexprs, divisibility and alignment of its arguments); the cubin is read
with the ``cuobjdump`` that ships inside Triton: registers, shared, local and stack
memory, the widths of the global loads and stores in the SASS, and the SASS
instructions per output element of each loop over the batch. The CUDA extension's
kernels are read the same way from the built library.

``sass_per_output``: the kernels loop over samples, so the instructions a thread
issues per sample are those of a loop body: the number of SASS instructions from a
backward branch's target to the branch (its static count: predicated instructions
issue too, and both sides of any branch inside would count, so it bounds the
instructions issued per iteration from above), divided by the output elements the
thread computes per iteration (``AotCase.outputs_per_iteration``: tile pixels per
thread times the channels the body handles; lanes of the tile past the canvas edge
count, e.g. 32 of the 256 columns of a 224 canvas). Only innermost loops count; the
case names them from the longest body to the shortest.
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

_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_ACCESS = re.compile(r"\b(LDG|STG)\.E((?:\.[A-Z0-9_]+)*)")
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4})\*/\s+([^;]*);")
_BRANCH = re.compile(r"\bBRA\b.*0x([0-9a-f]+)\s*$")
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
    loops: list[tuple[int, dict[int, int]]] = dataclasses.field(default_factory=list)  # per pass (aot.batch_loops)
    sass_per_output: dict[str, float] | None = None  # per named loop: instructions / outputs, per iteration
    sass_budgets: dict[str, float] | None = None
    loop_problems: list[str] = dataclasses.field(default_factory=list)

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
        found.extend(self.loop_problems)
        if self.sass_budgets:
            per_output = self.sass_per_output or {}
            for path, budget in self.sass_budgets.items():
                if path not in per_output:
                    found.append(f"no loop for the {path} path: loops {self.loops}")
                elif per_output[path] > budget:
                    found.append(f"{path}: {per_output[path]:.1f} SASS instructions per output > budget {budget}")
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


def batch_loops(sass: str, inner_trips: int = 1) -> list[tuple[int, dict[int, int]]]:
    """(instructions, global loads + stores by width in bits) issued per pass through each outermost loop body
    (backward branch target .. branch), longest first; the loops inside one count ``inner_trips`` times."""
    instructions = _INSTRUCTION.findall(sass)
    index = {int(addr, 16): i for i, (addr, _) in enumerate(instructions)}
    spans = []
    for addr, text in instructions:
        if (m := _BRANCH.search(text)) and int(m.group(1), 16) < int(addr, 16):
            spans.append((index[int(m.group(1), 16)], index[int(addr, 16)]))

    def inside(inner, outer):
        return outer[0] <= inner[0] and inner[1] <= outer[1] and inner != outer

    def cost(span, times):
        body = "\n".join(f"/*{a}*/ {t};" for a, t in instructions[span[0]:span[1] + 1])
        loads, stores = access_widths(body)
        accesses = Counter(loads) + Counter(stores)
        return times * (span[1] - span[0] + 1), Counter({bits: times * n for bits, n in accesses.items()})

    loops = []
    for outer in (s for s in spans if not any(inside(s, o) for o in spans)):
        n, accesses = cost(outer, 1)
        for inner in (s for s in spans if inside(s, outer)):
            extra_n, extra = cost(inner, inner_trips - 1)
            n, accesses = n + extra_n, accesses + extra
        loops.append((n, dict(accesses)))
    return sorted(loops, key=lambda loop: loop[0], reverse=True)


def per_output(loops: list[tuple[int, dict[int, int]]], paths: dict) -> tuple[dict[str, float], list[str]]:
    """SASS instructions per output element of each named loop, and the loops that do not fit their design.

    ``paths``: name -> LoopDesign, from the longest loop body down. The compiler may unroll a loop: a body
    with k times the accesses of one iteration (all of them, or those ``design.bits`` wide) holds k iterations.
    """
    found, problems = {}, []
    for (name, design), (length, widths) in zip(paths.items(), loops, strict=False):
        body_accesses = widths.get(design.bits, 0) if design.bits else sum(widths.values())
        unroll, rest = divmod(body_accesses, design.accesses)
        if unroll == 0 or rest:
            what = f"{design.bits}-bit" if design.bits else "global"
            problems.append(f"{name}: loop body has {body_accesses} {what} accesses, not a multiple of "
                            f"{design.accesses}")
            continue
        found[name] = round(length / (unroll * design.outputs), 2)
    return found, problems


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


def compile_case(case, arch: int) -> KernelReport:
    """Compile one case for one target and read its resources and memory accesses."""
    from vpfast.kernels import compose

    compiled = compile_launch(case.launch, arch)
    (registers, stack, shared, local), sass = report_cubin(compiled.asm["cubin"])
    loads, stores = access_widths(sass)
    num_warps = case.launch.constexprs.get("num_warps", 4)
    paths = case.sass_paths or {}
    loops = batch_loops(sass, max((d.inner_trips for d in paths.values()), default=1))
    spo, loop_problems = per_output(loops, paths)
    return KernelReport(
        case=case.name, kernel=case.launch.kernel.fn.__name__, arch=arch, num_warps=num_warps,
        registers=registers, stack=stack, shared=shared, local=local, loads=loads, stores=stores,
        # the launchers keep PROGRAMS_PER_SM x NUM_WARPS warps per SM (one-warp programs come NUM_WARPS times as
        # many), so every kernel's per-thread budget is that occupancy's, which each launch passes as maxnreg
        register_budget=compose.MAX_REGISTERS,
        min_store_bits=case.min_store_bits, min_load_bits=case.min_load_bits,
        loops=loops, sass_per_output=spo or None, sass_budgets={name: d.budget for name, d in paths.items()} or None,
        loop_problems=loop_problems,
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

    def per_output(r: KernelReport) -> str:
        return " ".join(f"{path}:{n:g}" for path, n in (r.sass_per_output or {}).items()) or "-"

    header = (f"{'case':36} {'kernel':28} {'sm':>3} {'regs':>4} {'stack':>5} {'smem':>6} {'loads':24} {'stores':12} "
              f"{'sass/output':22} ok")
    rows = [header, "-" * len(header)]
    for r in reports:
        problems = r.problems()
        rows.append(f"{r.case[:36]:36} {r.kernel[-28:]:28} {r.arch:>3} {r.registers:>4} {r.stack:>5} {r.shared:>6} "
                    f"{widths(r.loads)[:24]:24} {widths(r.stores)[:12]:12} {per_output(r)[:22]:22} "
                    f"{'; '.join(problems) or 'yes'}")
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
