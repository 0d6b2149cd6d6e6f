"""Checkpoints written atomically: the trainable tensors (safetensors), the config (JSON) and the
trainer state (optimizer, schedule, position in the data, RNG states).

A checkpoint is a directory. It is written next to its final place and swapped in with renames,
so an interruption at any moment leaves either the previous or the new checkpoint readable.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TENSORS, CONFIG, TRAINER = "prompt.safetensors", "config.json", "trainer.pt"


def save(directory: str | Path, tensors: dict[str, torch.Tensor], config, trainer_state: dict | None = None) -> Path:
    """Write the checkpoint ``directory`` atomically (replacing an older one)."""
    final = Path(directory)
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / TENSORS))
    config.save(tmp / CONFIG)
    if trainer_state is not None:
        torch.save(trainer_state, tmp / TRAINER)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def resolve(directory: str | Path) -> Path:
    """The readable checkpoint at ``directory`` (or the previous one, if a swap was interrupted)."""
    final = Path(directory)
    for candidate in (final, final.with_name(final.name + ".old")):
        if (candidate / TENSORS).exists() and (candidate / CONFIG).exists():
            return candidate
    raise FileNotFoundError(f"no checkpoint at {final} (expected {TENSORS} and {CONFIG} inside)")


def load_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(resolve(directory) / TENSORS))


def load_trainer_state(directory: str | Path) -> dict:
    path = resolve(directory) / TRAINER
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: this checkpoint holds a prompt only, it cannot resume training")
    return torch.load(path, weights_only=False)
