#!/usr/bin/env python3
"""Build vpfast wheels for specific CUDA versions, then smoke-test each one in a fresh environment.

    python3 scripts/build_wheels.py [TARGET ...] [--out dist] [--work build/wheels] [--python PY] [--no-smoke]

Targets (default: cu130 pure):
    cu130  torch 2.14.1 (CUDA 13.0), nvcc 13.0 from $CUDA_HOME (default /usr/local/cuda),
           sm_80, sm_90, sm_100, sm_120 and PTX for sm_120; version label +cu130
    cu128  torch 2.10.0 (CUDA 12.8) and a CUDA 12 toolkit in $CUDA12_HOME; skipped, saying why,
           when that toolkit is not there
    pure   VPFAST_SKIP_EXT=1: no extension, the Triton kernels and reference paths only; label +pure

Each target builds in its own copy of the source tree (no shared object files) with its own venv;
pip's downloads are cached in <work>/wheelhouse, so a second run needs no network for them. The
extension uses torch's stable ABI with TORCH_TARGET_VERSION 2.10, so a CUDA wheel's Requires-Dist is
``torch>=2.10``: one wheel serves every torch from 2.10 on with a CUDA runtime of the same major
version (checked when vpfast is imported: a mismatch warns once and falls back, never crashes).
The smoke test installs each wheel into a fresh venv (pip pulls its torch), then, from outside the
source tree, runs ``vpfast selftest`` and ``vpfast info``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Target:
    name: str
    torch: str  # the torch the extension is compiled against (and the smoke test's pin)
    label: str  # PEP 440 local version label
    env: dict = field(default_factory=dict)  # build environment
    cuda_home_var: str | None = None  # environment variable naming the toolkit (None: no CUDA build)
    default_cuda_home: str | None = None
    index_url: str | None = None  # where pip finds this torch (None: the default index)


TARGETS = {
    "cu130": Target("cu130", "2.14.1", "cu130", {"TORCH_CUDA_ARCH_LIST": "8.0;9.0;10.0;12.0+PTX",
                                                  "VPFAST_FORCE_CUDA": "1"}, "CUDA_HOME", "/usr/local/cuda"),
    "cu128": Target("cu128", "2.10.0", "cu128", {"TORCH_CUDA_ARCH_LIST": "8.0;9.0+PTX", "VPFAST_FORCE_CUDA": "1"},
                    "CUDA12_HOME", None),
    "pure": Target("pure", "2.14.1", "pure", {"VPFAST_SKIP_EXT": "1"}),
}


def log(message: str) -> None:
    print(f"[build_wheels] {message}", flush=True)


def run(command: list[str], **kwargs) -> None:
    log("$ " + " ".join(str(c) for c in command))
    subprocess.run(command, check=True, **kwargs)


def source_copy(destination: Path) -> Path:
    """A fresh copy of the tracked and untracked-but-not-ignored files (the working tree, not only HEAD)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    shutil.rmtree(destination, ignore_errors=True)
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


def venv(path: Path, fresh: bool = False) -> Path:
    if fresh:
        shutil.rmtree(path, ignore_errors=True)
    if not (path / "bin" / "python").exists():
        run([sys.executable, "-m", "venv", str(path)])
    return path / "bin" / "python"


def pip_install(python: Path, wheelhouse: Path, *requirements: str, index_url: str | None = None) -> None:
    """Download into the wheelhouse (a no-op for what is there), then install from it alone."""
    index = ["--index-url", index_url] if index_url else []
    run([str(python), "-m", "pip", "download", "--quiet", "--dest", str(wheelhouse), "--find-links",
         str(wheelhouse), *index, *requirements])
    run([str(python), "-m", "pip", "install", "--quiet", "--no-index", "--find-links", str(wheelhouse),
         *requirements])


def cuda_home(target: Target) -> Path | None:
    if target.cuda_home_var is None:
        return None
    value = os.environ.get(target.cuda_home_var) or target.default_cuda_home
    return Path(value) if value and (Path(value) / "bin" / "nvcc").is_file() else None


def torch_version(python: Path) -> str | None:
    done = subprocess.run([str(python), "-c", "import torch; print(torch.__version__)"], capture_output=True,
                          text=True, check=False)
    return done.stdout.strip().split("+")[0] if done.returncode == 0 else None


def build(target: Target, work: Path, out: Path, wheelhouse: Path, python: Path | None = None) -> Path:
    """Build ``target``'s wheel into ``out`` with ``python`` (default: a venv of its own); returns its path."""
    home = cuda_home(target)
    if target.cuda_home_var and home is None:
        raise FileNotFoundError(f"no nvcc under ${target.cuda_home_var} "
                                f"({os.environ.get(target.cuda_home_var) or target.default_cuda_home or 'unset'})")
    if python is None or torch_version(python) != target.torch:
        python = venv(work / target.name / "build-venv")
        pip_install(python, wheelhouse, f"torch=={target.torch}", "setuptools>=64", "wheel", "ninja",
                    index_url=target.index_url)
    source = source_copy(work / target.name / "src")
    env = dict(os.environ, **target.env, VPFAST_LOCAL_VERSION=target.label,
               MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 1)))
    if home is not None:
        env.update(CUDA_HOME=str(home), PATH=f"{home / 'bin'}{os.pathsep}{env['PATH']}")
    staging = work / target.name / "dist"
    shutil.rmtree(staging, ignore_errors=True)
    run([str(python), "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--wheel-dir", str(staging),
         str(source)], env=env)
    (wheel,) = staging.glob("vpfast-*.whl")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(wheel, out / wheel.name)
    return out / wheel.name


def smoke(target: Target, wheel: Path, work: Path, wheelhouse: Path) -> None:
    """Install ``wheel`` in a fresh venv (with the torch it was built for) and check it from outside the tree."""
    python = venv(work / target.name / "smoke-venv", fresh=True)
    pip_install(python, wheelhouse, f"torch=={target.torch}", str(wheel), index_url=target.index_url)
    outside = work / target.name / "smoke-cwd"
    outside.mkdir(parents=True, exist_ok=True)
    run([str(python), "-m", "vpfast", "selftest"], cwd=outside)
    run([str(python), "-m", "vpfast", "info"], cwd=outside)
    shutil.rmtree(python.parent.parent)  # a torch venv is several GB: keep it only when the test fails


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", default=["cu130", "pure"], help=f"any of {sorted(TARGETS)}")
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="where the wheels go")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "wheels", help="sources, venvs, wheelhouse")
    parser.add_argument("--no-smoke", action="store_true", help="build only")
    parser.add_argument("--python", type=Path, help="build with this interpreter where its torch is the target's "
                                                    "(e.g. the dev venv), instead of a build venv")
    args = parser.parse_args(argv)
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {unknown}: expected any of {sorted(TARGETS)}")
    wheelhouse = args.work / "wheelhouse"
    wheelhouse.mkdir(parents=True, exist_ok=True)
    failed, skipped = [], []
    for name in args.targets:
        target, started = TARGETS[name], time.perf_counter()
        try:
            wheel = build(target, args.work, args.out, wheelhouse, args.python)
        except FileNotFoundError as exc:
            log(f"{name}: skipped, its toolchain is not here: {exc}")
            skipped.append(name)
            continue
        except subprocess.CalledProcessError as exc:
            log(f"{name}: build failed ({exc})")
            failed.append(name)
            continue
        log(f"{name}: built {wheel.name} in {time.perf_counter() - started:.0f} s")
        if not args.no_smoke:
            try:
                smoke(target, wheel, args.work, wheelhouse)
                log(f"{name}: smoke test passed")
            except subprocess.CalledProcessError as exc:
                log(f"{name}: smoke test failed ({exc})")
                failed.append(name)
    log(f"done: failed {failed or 'none'}, skipped {skipped or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
