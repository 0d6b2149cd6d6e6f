"""The training loop behind ``vpfast train``: uint8 batches composed on the device, checkpoints that
resume exactly, model selection on a validation split, metrics, plots and DistributedDataParallel;
the few-shot (``shots``) and base-to-novel (``base_to_novel``) protocols.

Under ``torchrun`` (``WORLD_SIZE`` > 1) each rank takes its slice of every global batch and the
gradient is all-reduced before the optimizer step, so the run follows the single-process one.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vpfast import methods, pretrained
from vpfast.train import checkpoint, data, fast
from vpfast.train import progress as progress_output
from vpfast.train.build import (
    PromptedClassifier,
    build_adapter,
    build_backbone,
    build_mapping,
    build_optimizer,
    build_prompter,
    build_tokens,
)
from vpfast.train.config import PIXEL_METHODS, TrainConfig
from vpfast.train.interrupt import EXIT_CODES, StopSignals, TrainingInterrupted
from vpfast.train.metrics import MetricsLog, plot
from vpfast.train.resume import check_compatible, restore, saved_config
from vpfast.train.step import TrainStep, graph_support, make_step

CHECKPOINT_EVERY_S = 600.0  # last/ is also saved after this long without a save, whatever --checkpoint-every says


def _distributed() -> tuple[int, int]:
    """(rank, world size), joining the process group that torchrun describes in the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device:
        return torch.device(cfg.device)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank, visible = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local_rank >= visible:
        raise ValueError(f"LOCAL_RANK={local_rank} needs a GPU of its own but {visible} CUDA device(s) are visible: "
                         f"start at most {visible} process(es) per node, or pass --device cpu")
    return torch.device("cuda", local_rank)


def load_datasets(cfg: TrainConfig, size: int):
    """(train, val, test, class names): the validation split is held out of the training set.

    ``shots`` keeps K seeded training images per class; ``base_to_novel`` keeps the base classes in train and
    val (the class names stay all of them, so CLIP's head covers the novel classes too).
    """
    if cfg.data in data.PACKAGED:
        train, test = data.load_packaged(cfg.data, seed=cfg.seed)
    elif cfg.data.startswith("torchvision:"):
        train, test = data.load_torchvision(cfg.data.split(":", 1)[1], cfg.data_root, size, cfg.download)
    else:
        train, test = data.load_image_folder(cfg.data, size, device=data.decode_device(cfg.data_device, _device(cfg)))
    classes = data.class_names(train)
    train, val = data.validation_split(train, cfg.val_fraction, cfg.seed)
    if cfg.base_to_novel:  # train and select on the base classes; the test set is split when scored
        base = data.num_base_classes(len(classes))
        train, val = data.class_range(train, 0, base), data.class_range(val, 0, base)
    if cfg.shots:
        train = data.few_shot(train, cfg.shots, cfg.seed)
    if cfg.train_limit:
        train = _limit(train, cfg.train_limit)
    if cfg.test_limit:
        test = _limit(test, cfg.test_limit)
    return train, val, test, classes


def _limit(dataset, n: int):
    index = torch.arange(min(n, len(dataset)))
    if isinstance(dataset, data.TensorImages):
        return dataset.subset(index)
    subset = torch.utils.data.Subset(dataset, index.tolist())
    subset.classes = data.class_names(dataset)
    return subset


@torch.no_grad()
def evaluate(model: PromptedClassifier, dataset, batch_size: int, device: torch.device, num_workers: int = 0,
             desc: str = "eval", progress: bool = True, columns: slice = slice(None),
             after_batch: Callable[[], None] | None = None) -> float:
    """Top-1 accuracy of the prompted model on ``dataset``, among the classes ``columns`` of its logits.

    ``after_batch`` runs after every batch (training uses it to stop a validation on a signal)."""
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    order = data.epoch_batches(len(dataset), batch_size, seed=0, epoch=0, shuffle=False)
    total = -(-len(dataset) // batch_size)
    for images, labels in progress_output.bar(data.batches(dataset, order, num_workers), total, desc, progress):
        logits = model(images.to(device, non_blocking=True))[:, columns]
        correct += (logits.argmax(1) == labels.to(device, non_blocking=True)).sum()
        if after_batch is not None:
            after_batch()
    return int(correct) / len(dataset)


@torch.no_grad()
def refresh_mapping(model: PromptedClassifier, dataset, cfg: TrainConfig, device: torch.device,
                    progress: bool = True) -> None:
    """Recount (source prediction, target label) with the current prompt and reassign the mapping."""
    model.eval()
    n = min(cfg.mapping_samples, len(dataset))
    order = data.epoch_batches(n, cfg.batch_size, seed=cfg.seed, epoch=0, shuffle=False)
    for images, labels in progress_output.bar(data.batches(dataset, order, cfg.num_workers), -(-n // cfg.batch_size),
                                              f"{cfg.method} label mapping", progress):
        model.mapping.update(model.source_logits(images.to(device, non_blocking=True)), labels.to(device))
    model.mapping.assign()


def base_columns(cfg: TrainConfig, num_classes: int) -> slice:
    """The logits trained and validated on: the base classes under ``base_to_novel``, else all."""
    return slice(0, data.num_base_classes(num_classes)) if cfg.base_to_novel else slice(None)


def base_to_novel_accuracy(model: PromptedClassifier, test_set, num_classes: int, cfg: TrainConfig,
                           device: torch.device, progress: bool = True) -> dict:
    """Base test images scored among the base classes, novel ones among the novel classes, and the harmonic mean."""
    base = data.num_base_classes(num_classes)
    accuracy = {}
    for name, start, stop in (("base", 0, base), ("novel", base, None)):
        subset = data.class_range(test_set, start, stop)
        if len(subset) == 0:
            raise ValueError(f"the test set has no images of the {name} classes (is --test-limit too small?)")
        accuracy[name] = evaluate(model, subset, cfg.batch_size, device, cfg.num_workers, f"{cfg.method} test ({name})",
                                  progress, columns=slice(start, stop))
    total = accuracy["base"] + accuracy["novel"]
    harmonic = 2 * accuracy["base"] * accuracy["novel"] / total if total else 0.0
    return {"base_acc": accuracy["base"], "novel_acc": accuracy["novel"], "harmonic_mean": harmonic}


def build_run(cfg: TrainConfig, device: torch.device):
    """(model, datasets, classes) for a resolved config; seeded, so random-weight backbones rebuild identically."""
    torch.manual_seed(cfg.seed)
    # The CLIP head needs the class names first; image files are decoded at the prompter's inner size.
    train, val, test, classes = load_datasets(cfg, fast.decode_size(cfg))
    (train, val, test), _ = data.store([train, val, test], cfg.data_device, device)
    backbone = build_backbone(cfg, classes, device)
    whole = fast.compile_target(cfg, device, methods.get(cfg.method).kind) == "prompted forward"
    model = PromptedClassifier(build_prompter(cfg, backbone), backbone, build_mapping(cfg, backbone, len(classes)),
                               build_tokens(cfg, backbone), build_adapter(cfg, backbone),
                               compile=fast.COMPILE_BACKEND if whole else False)
    return model.to(device), (train, val, test), classes


class _Stop(Exception):
    """A stop signal reached a safe point: unwinds to ``train``, which saves and raises TrainingInterrupted."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _batch_loss(ddp: torch.nn.Module, model: PromptedClassifier, images: torch.Tensor, labels: torch.Tensor,
                columns: slice, global_n: int, world: int, stand_in: bool = False) -> torch.Tensor:
    """The loss of this rank's slice, scaled so that DDP's mean of the ranks' gradients is the gradient of the
    global batch's mean loss (slices may differ in size: the last batch of an epoch is cut as it comes).
    ``stand_in``: the slice was empty and ``images`` is a placeholder that must not count (weight 0)."""
    logits = ddp(images)[:, columns]
    extra = model.auxiliary_loss()
    if world == 1:
        loss = F.cross_entropy(logits, labels)
        return loss if extra is None else loss + extra
    scale = 0.0 if stand_in else world / global_n
    loss = F.cross_entropy(logits, labels, reduction="sum") * scale
    return loss if extra is None else loss + extra * (images.shape[0] * scale)


def _global_value(loss: torch.Tensor, world: int) -> float:
    """The global batch's loss (every rank must call this at the same step under DDP)."""
    if world == 1:
        return loss.item()
    value = loss.detach().clone()
    dist.all_reduce(value)
    return value.item() / world


def _continue_command(out: Path) -> str:
    return f"vpfast train --resume --out {shlex.quote(str(out))}"


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True,
          hook: Callable[[str, dict], None] | None = None, mapping: torch.Tensor | None = None) -> dict | None:
    """Train a prompt as ``cfg`` says; returns (and writes to ``<out>/results.json``) the final figures.

    With ``resume`` the run continues from ``<out>/last`` exactly where it stopped; ``cfg`` must match the saved
    config except the safe overrides of ``vpfast.train.resume`` (checked before anything in ``out`` changes).
    ``max_steps`` stops early after saving a checkpoint. SIGINT/SIGTERM stop at the next optimizer step or
    validation batch (under DDP: within ``log_every`` of them), save ``last/`` and raise ``TrainingInterrupted``
    (an interrupted validation is redone on resume); any other exception saves ``last/`` and propagates.
    ``hook(event, state)`` runs after every optimizer step (``"step"``), validation batch (``"validation"``)
    and once training is done (``"trained"``). Under DDP, ranks other than 0 return None.
    ``mapping``: a frequency label mapping counted beforehand (``vpfast demo`` counts one per backbone),
    used instead of counting one before the first epoch.
    """
    cfg = cfg.resolved()
    out = Path(cfg.out)
    saved = None
    if resume:  # read and check everything before anything in the run directory changes
        saved_cfg = saved_config(out)
        saved = checkpoint.load_trainer_state(out / "last")
        check_compatible(saved_cfg, cfg, out, saved["state"]["epoch"])
        saved["tensors"] = checkpoint.load_tensors(out / "last")
    rank, world = _distributed()
    device = _device(cfg)
    main_rank = rank == 0
    progress = progress and main_rank
    model, (train_set, val_set, test_set), classes = build_run(cfg, device)
    if mapping is not None:
        model.mapping.mapping.copy_(mapping)
    columns = base_columns(cfg, len(classes))
    optimizer, schedule = build_optimizer(cfg, model, cfg.epochs)
    state = {"epoch": 0, "step_in_epoch": 0, "step": 0, "best_val": -1.0, "train_seconds": 0.0, "train_images": 0,
             "validate": False}
    extension = None
    if saved is not None:
        state = saved["state"]
        extension = restore(saved, saved_cfg.epochs, cfg.epochs, model, optimizer, schedule)
    ddp = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                     else None) if world > 1 else model)
    log = MetricsLog(out / "metrics.jsonl", resume_step=state["step"] if resume else None) if main_rank else None
    step = TrainStep(lambda images, labels, global_n, stand_in: _batch_loss(
        ddp, model, images, labels, columns, global_n, world, stand_in), optimizer, device, model.draw_step)
    why_not = graph_support(device, world, optimizer)
    run_step, path = make_step(step, fast.cuda_graph(cfg), why_not, device)
    speed = fast.report(model, train_set, path, why_not)
    if extension is not None and main_rank:
        progress_output.say(f"--epochs {extension['epochs_from']} -> {extension['epochs_to']}: the schedule is now "
                            f"the one of a {cfg.epochs}-epoch run, continuing at epoch {state['epoch'] + 1} with lr "
                            f"{extension['lr']:.6g}")
        log.write(step=state["step"], epoch=state["epoch"], **extension)
    n_batches = -(-len(train_set) // cfg.batch_size)
    last_save = time.monotonic()

    def save_last() -> None:
        nonlocal last_save
        if main_rank:
            checkpoint.save(out / "last", model.trainable_state(), cfg, {
                "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "state": dict(state),
                "rng": torch.get_rng_state()})
        last_save = time.monotonic()

    polls = {"validation": 0}

    def safe_point(event: str) -> None:
        """Raise _Stop if a signal came. Under DDP the ranks agree through a blocking all-reduce, so they poll
        only every ``log_every`` steps or validation batches (a step that logs synchronizes anyway)."""
        if hook is not None:
            hook(event, state)
        polls["validation"] = polls["validation"] + 1 if event == "validation" else 0
        count = state["step"] if event == "step" else polls["validation"]
        if world > 1 and event != "trained" and count % cfg.log_every:
            return
        signum = signals.requested()
        if signum:
            raise _Stop(signum)

    def validate() -> None:
        epoch = state["epoch"]
        val_acc = evaluate(model, val_set, cfg.batch_size, device, cfg.num_workers, f"{cfg.method} validation",
                           progress, columns, after_batch=lambda: safe_point("validation"))
        if main_rank:
            log.write(step=state["step"], epoch=epoch, val_acc=val_acc)
        if val_acc > state["best_val"]:
            if main_rank:
                checkpoint.save(out / "best", model.trainable_state(), cfg)
            state["best_val"] = val_acc
        progress_output.say(f"{cfg.method} epoch {epoch}/{cfg.epochs}: validation accuracy {val_acc:.4f} "
                            f"(best {state['best_val']:.4f})", progress)
        state["validate"] = False
        save_last()

    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.json")
        if not resume:  # the first record, so a resumed run logs what an uninterrupted one does
            log.write(step=state["step"], **speed)
    with StopSignals(device, world > 1) as signals:
        try:
            while True:
                if state["validate"]:
                    validate()
                if state["epoch"] >= cfg.epochs:
                    safe_point("trained")  # a signal during the last save must not be lost
                    break
                epoch = state["epoch"]
                if state["step_in_epoch"] == 0 and model.mapping is not None \
                        and hasattr(model.mapping, "should_refresh") and model.mapping.should_refresh(epoch) \
                        and (epoch > 0 or mapping is None):
                    refresh_mapping(model, train_set, cfg, device, progress)
                model.train()
                order = list(data.epoch_batches(len(train_set), cfg.batch_size, cfg.seed, epoch,
                                                start=state["step_in_epoch"], rank=rank, world_size=world))
                # a last batch with fewer images than ranks leaves some slices empty, but every rank must step:
                # those load one stand-in image that the loss weighs 0
                stand_ins = [len(index) == 0 for index in order]
                order = [index if len(index) else torch.zeros(1, dtype=torch.long) for index in order]
                bar = progress_output.EpochProgress(f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}", n_batches,
                                                    state["step_in_epoch"], progress)
                tick = time.perf_counter()
                for (images, labels), stand_in in zip(data.batches(train_set, order, cfg.num_workers), stand_ins,
                                                      strict=True):
                    global_n = min(cfg.batch_size, len(train_set) - state["step_in_epoch"] * cfg.batch_size)
                    images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                    run_step(images, labels, global_n if world > 1 else None, stand_in)  # host args: graph keys
                    state["step_in_epoch"] += 1
                    state["step"] += 1
                    state["train_images"] += global_n
                    state["train_seconds"] += time.perf_counter() - tick
                    value = None
                    if state["step"] % cfg.log_every == 0:
                        value = _global_value(step.mean_loss(), world)
                        if main_rank:
                            log.write(step=state["step"], epoch=epoch, loss=value, lr=optimizer.param_groups[0]["lr"])
                    bar.step(value)
                    stop = cfg.max_steps is not None and state["step"] >= cfg.max_steps
                    if stop or (cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0) \
                            or time.monotonic() - last_save >= CHECKPOINT_EVERY_S:
                        save_last()
                    if stop:
                        bar.close()
                        return {"stopped_at_step": state["step"]}
                    safe_point("step")
                    tick = time.perf_counter()
                bar.close()
                schedule.step()
                state.update(epoch=epoch + 1, step_in_epoch=0, validate=True)
        except _Stop as stopped:
            save_last()
            if state["validate"]:
                where = f"during the validation after epoch {state['epoch']}/{cfg.epochs} (redone on resume)"
            elif state["epoch"] >= cfg.epochs:
                where = f"after the last epoch ({cfg.epochs}), before the test evaluation (done on resume)"
            else:
                where = f"at epoch {state['epoch'] + 1}/{cfg.epochs}, step {state['step_in_epoch']}/{n_batches}"
            raise TrainingInterrupted(
                f"vpfast: {StopSignals.name(stopped.signum)}: training stopped {where}; saved {out / 'last'}; "
                f"continue with: {_continue_command(out)}", EXIT_CODES[stopped.signum]) from None
        except BaseException:
            save_last()
            raise
    if not main_rank:
        return None
    results = {
        "method": cfg.method, "model": cfg.model, "data": cfg.data, "epochs": cfg.epochs, "steps": state["step"],
        "best_val_acc": state["best_val"]}
    if cfg.base_to_novel:  # ProVP's protocol: the final epoch's prompts, no selection on held-out data
        results.update(base_to_novel_accuracy(model, test_set, len(classes), cfg, device, progress))
    else:
        model.load_trainable_state(checkpoint.load_tensors(out / "best"))
        results["test_acc"] = evaluate(model, test_set, cfg.batch_size, device, cfg.num_workers, f"{cfg.method} test",
                                       progress)
    results.update({
        "trainable_params": model.num_trainable,
        "train_images_per_s": state["train_images"] / max(state["train_seconds"], 1e-9), **speed,
    })
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    pretrained.save_run(out / "pretrained", model, cfg, classes, results)  # the shareable prompt
    if cfg.method in PIXEL_METHODS:
        model.prompter.to_image().save(out / "prompt.png")
    plot(out / "metrics.jsonl", out / "training.png")
    return results


def evaluate_checkpoint(directory: str | Path, data_name: str | None = None, progress: bool = True) -> dict:
    """Test accuracy of a saved prompt (``vpfast eval``), on its own dataset or on ``data_name``.

    ``directory`` is a checkpoint or a run directory (its ``best/`` is used). The saved config is data: it
    never makes eval download a dataset (and so write into its ``data_root``).
    """
    directory = checkpoint.locate(directory)
    cfg = TrainConfig.load(checkpoint.config_path(directory))
    if data_name:
        cfg.data = data_name
    cfg.download = False
    cfg = cfg.resolved()
    device = _device(cfg)
    model, (_, _, test_set), classes = build_run(cfg, device)
    model.load_trainable_state(checkpoint.load_tensors(directory))
    if cfg.base_to_novel:
        return {"checkpoint": str(directory), "data": cfg.data,
                **base_to_novel_accuracy(model, test_set, len(classes), cfg, device, progress)}
    acc = evaluate(model, test_set, cfg.batch_size, device, cfg.num_workers, f"{cfg.method} test", progress)
    return {"checkpoint": str(directory), "data": cfg.data, "test_acc": acc}
