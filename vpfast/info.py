"""The report behind ``vpfast info``: versions, devices, the compiled extension and each op's backend.

What a bug report needs in one place, and the answer to "which implementation will run here?".
``collect()`` returns plain JSON-serializable data; ``format_report()`` renders it for a terminal.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import platform
import sys

import torch

import vpfast
from vpfast import _extension
from vpfast.ops import _dispatch

# Optional packages reported by distribution name (read from metadata: importing them is slow).
OPTIONAL_PACKAGES = {"open_clip": "open_clip_torch", "timm": "timm", "torchvision": "torchvision"}


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _devices() -> list[dict]:
    if not torch.cuda.is_available():
        return []
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        devices.append(
            {
                "index": index,
                "name": props.name,
                "capability": f"{props.major}.{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1),
            }
        )
    return devices


def _backends() -> tuple[dict[str, dict[str, str]], str]:
    """The backend table, after importing the ops so that every op is registered."""
    try:
        importlib.import_module("vpfast.ops")
    except Exception as exc:  # report a broken install instead of failing the report
        return _dispatch.backend_table(), f"importing vpfast.ops failed: {exc!r}"
    return _dispatch.backend_table(), ""


def collect() -> dict:
    """Everything ``vpfast info`` shows, as JSON-serializable data."""
    triton_ok, triton_version = _dispatch.triton_status()
    ext = _extension.status()
    backends, backends_error = _backends()
    return {
        "vpfast": ext.build_info.get("version") or vpfast.__version__,  # with the wheel's label, e.g. +cu130
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version if triton_ok else None,
        "triton_error": "" if triton_ok else triton_version,
        "numpy": _dist_version("numpy"),
        "optional": {module: _dist_version(dist) for module, dist in OPTIONAL_PACKAGES.items()},
        "cuda_available": torch.cuda.is_available(),
        "devices": _devices(),
        "env": _dispatch.environment(),  # the values in force: read when vpfast was imported
        "extension": {
            "loaded": ext.loaded,
            "has_cuda": ext.has_cuda,
            "reason": ext.reason,
            "build_info": ext.build_info,
        },
        "backends": backends,
        "backends_error": backends_error,
    }


def _or(value: object, missing: str = "not installed") -> str:
    return missing if value is None else str(value)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _build_line(info: dict) -> str:
    if not info.get("extension"):
        return "pure-Python build (VPFAST_SKIP_EXT=1)" if info else "no build metadata"
    parts = [f"torch {info.get('torch')}"]
    if info.get("abi") == "stable":
        parts[0] += f" (stable ABI, loads on torch >= {info.get('torch_target')})"
    if info.get("cuda_kernels"):
        arch = info.get("cuda_arch_list")
        parts.append(f"CUDA {info.get('torch_cuda')}, nvcc {info.get('nvcc')}, arch {arch}")
    else:
        skipped = info.get("cuda_kernels_skipped")
        parts.append(f"CPU only ({skipped})" if skipped else "CPU only")
    return ", ".join(parts)


def format_report(report: dict) -> str:
    """Render ``collect()``'s data as aligned text sections."""
    ext, build = report["extension"], report["extension"]["build_info"]
    torch_build = f"CUDA {report['torch_cuda']}" if report["torch_cuda"] else "CPU"
    built = f"{_or(build.get('commit'), 'unknown')} (built {_or(build.get('build_time'), 'unknown')})"
    rows: list[tuple[str, str]] = [
        (f"vpfast {report['vpfast']}", ""),
        ("  python", f"{report['python']} ({report['platform']})"),
        ("  torch", f"{report['torch']} ({torch_build})"),
        ("  triton", _or(report["triton"], report["triton_error"])),
        ("  numpy", _or(report["numpy"])),
    ]
    rows += [(f"  {name}", _or(version)) for name, version in report["optional"].items()]
    rows.append(("devices", ""))
    if not report["devices"]:
        rows.append(("  cuda", "not available"))
    for dev in report["devices"]:
        sm = dev["capability"].replace(".", "")
        rows.append((f"  cuda:{dev['index']}", f"{dev['name']} (sm_{sm}, {dev['memory_gib']} GiB)"))
    rows.append(("environment", ""))
    rows += [(f"  {name}", _or(value, "(unset)")) for name, value in report["env"].items()]
    rows += [
        ("extension vpfast._C", ""),
        ("  loaded", _yes(ext["loaded"])),
        ("  cuda kernels", _yes(ext["has_cuda"])),
        ("  built for", _build_line(build)),
        ("  commit", built),
    ]
    if ext["reason"]:
        rows.append(("  reason", ext["reason"]))
    rows.append(("backends (cpu | cuda)", ""))
    if report["backends_error"]:
        rows.append(("  error", report["backends_error"]))
    rows += [(f"  {op}", f"{row['cpu']} | {row['cuda']}") for op, row in sorted(report["backends"].items())]
    width = max(len(key) for key, value in rows if value) + 2
    return "\n".join(f"{key:<{width}}{value}" if value else key for key, value in rows)
