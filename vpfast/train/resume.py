"""``vpfast train --resume``: the saved run's config, with only the overrides that cannot change what it learns.

A resumed run continues the saved config. A value given with ``--resume`` must equal the saved one, except
the fields in ``SAFE_OVERRIDES``: where data is read, stored, loaded and logged, the device, whether the
step is replayed from CUDA graphs, when to stop,
and ``epochs``, which extends (or shortens, not below the epochs done) the run. After a change of ``epochs``
the schedule is the one a run started with the new number would follow: the learning rate of every remaining
epoch is read off that curve (the epochs already trained keep their rates). ``max_steps`` is not inherited:
it stops the invocation that sets it.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import torch

from vpfast.train import checkpoint
from vpfast.train.config import TrainConfig
from vpfast.train.step import count_steps_on_device

SAFE_OVERRIDES = ("epochs", "max_steps", "log_every", "checkpoint_every", "num_workers", "device", "data_root",
                  "download", "out", "data_device", "cuda_graph")


def saved_config(out: str | Path) -> TrainConfig:
    """The config saved with ``<out>/last`` (its newest complete copy), resolved."""
    return TrainConfig.load(checkpoint.config_path(Path(out) / "last")).resolved()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_compatible(saved: TrainConfig, wanted: TrainConfig, out: str | Path, epochs_done: int | None = None) -> None:
    """Raise ValueError naming the flag, the saved and the given value if ``wanted`` differs from ``saved`` in a
    field that is not a safe override, or if it asks for fewer epochs than were already trained."""
    for f in dataclasses.fields(TrainConfig):
        before, after = getattr(saved, f.name), getattr(wanted, f.name)
        if f.name not in SAFE_OVERRIDES and before != after:
            raise ValueError(f"{_flag(f.name)} differs from the run being resumed: {out} was trained with "
                             f"{before!r}, --resume was given {after!r}. --resume continues the saved run; only "
                             f"{', '.join(map(_flag, SAFE_OVERRIDES))} may change (start a new run in another --out "
                             f"to change the rest)")
    if epochs_done is not None and wanted.epochs < epochs_done:
        raise ValueError(f"--epochs {wanted.epochs} is fewer than the {epochs_done} epoch(s) {out} has already trained")


def resume_config(out: str | Path, given: dict[str, object]) -> TrainConfig:
    """The saved config of the run in ``out`` with ``given`` (field name -> value, the flags typed with
    ``--resume``) applied; ValueError on an unknown field or on a change that is not a safe override."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}: expected TrainConfig fields")
    saved = saved_config(out)
    wanted = dataclasses.replace(saved, **{"max_steps": None, **given, "out": str(out)})
    epochs_done = checkpoint.load_trainer_state(Path(out) / "last")["state"]["epoch"]
    check_compatible(saved, wanted.resolved(), out, epochs_done)
    return wanted


def _rates_after(schedule, optimizer: torch.optim.Optimizer, epochs_done: int) -> list[float]:
    """The learning rates of a fresh schedule after ``epochs_done`` epochs."""
    with warnings.catch_warnings():  # stepping a schedule before any optimizer step is intended here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(epochs_done):
            schedule.step()
    return [group["lr"] for group in optimizer.param_groups]


def restore(saved: dict, saved_epochs: int, epochs: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            schedule) -> dict | None:
    """Load a saved trainer state (``load_trainer_state`` plus ``"tensors"``, the trainable tensors) into a freshly
    built ``model``, ``optimizer`` and ``schedule`` (built for ``epochs``). If ``epochs`` differs from
    ``saved_epochs`` the schedule is the fresh one, stepped to the epochs done; returns the change for the log
    (``epochs_from``, ``epochs_to``, ``lr``), else None."""
    model.load_trainable_state(saved["tensors"])
    done = saved["state"]["epoch"]
    rates = _rates_after(schedule, optimizer, done) if epochs != saved_epochs else None
    optimizer.load_state_dict(saved["optimizer"])
    count_steps_on_device(optimizer)  # the saved run's device may differ from this one's
    torch.set_rng_state(saved["rng"])
    if rates is None:
        schedule.load_state_dict(saved["schedule"])
        return None
    for group, rate in zip(optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    return {"epochs_from": saved_epochs, "epochs_to": epochs, "lr": rates[0]}
