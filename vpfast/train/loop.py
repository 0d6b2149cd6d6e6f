"""The training loop behind ``vpfast train``: uint8 batches composed on the device, checkpoints that
resume exactly, model selection on a validation split, metrics, plots and DistributedDataParallel;
the few-shot (``shots``) and base-to-novel (``base_to_novel``) protocols.

Under ``torchrun`` (``WORLD_SIZE`` > 1) each rank takes its slice of every global batch and the
gradient is all-reduced before the optimizer step, so the run follows the single-process one.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from vpfast.train import checkpoint, data, fast
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
from vpfast.train.metrics import MetricsLog, plot
from vpfast.train.step import TrainStep, graph_support, make_step


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
        train, test = data.load_image_folder(cfg.data, size)
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
             desc: str = "eval", progress: bool = True, columns: slice = slice(None)) -> float:
    """Top-1 accuracy of the prompted model on ``dataset``, among the classes ``columns`` of its logits."""
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    order = data.epoch_batches(len(dataset), batch_size, seed=0, epoch=0, shuffle=False)
    total = -(-len(dataset) // batch_size)
    for images, labels in tqdm(data.batches(dataset, order, num_workers), total=total, desc=desc, leave=False,
                               disable=not progress):
        logits = model(images.to(device, non_blocking=True))[:, columns]
        correct += (logits.argmax(1) == labels.to(device, non_blocking=True)).sum()
    return int(correct) / len(dataset)


@torch.no_grad()
def refresh_mapping(model: PromptedClassifier, dataset, cfg: TrainConfig, device: torch.device,
                    progress: bool = True) -> None:
    """Recount (source prediction, target label) with the current prompt and reassign the mapping."""
    model.eval()
    n = min(cfg.mapping_samples, len(dataset))
    order = data.epoch_batches(n, cfg.batch_size, seed=cfg.seed, epoch=0, shuffle=False)
    for images, labels in tqdm(data.batches(dataset, order, cfg.num_workers), desc="label mapping", leave=False,
                               total=-(-n // cfg.batch_size), disable=not progress):
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
        accuracy[name] = evaluate(model, subset, cfg.batch_size, device, cfg.num_workers, f"test ({name})", progress,
                                  columns=slice(start, stop))
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
    model = PromptedClassifier(build_prompter(cfg, backbone), backbone, build_mapping(cfg, backbone, len(classes)),
                               build_tokens(cfg, backbone), build_adapter(cfg, backbone))
    return model.to(device), (train, val, test), classes


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train a prompt as ``cfg`` says; returns (and writes to ``<out>/results.json``) the final figures.

    With ``resume`` the run continues from ``<out>/last`` exactly where it stopped. ``max_steps``
    stops early after saving a checkpoint (that is how an interruption is simulated in tests).
    """
    cfg = cfg.resolved()
    rank, world = _distributed()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes {world}")
    device = _device(cfg)
    out = Path(cfg.out)
    main_rank = rank == 0
    progress = progress and main_rank
    model, (train_set, val_set, test_set), classes = build_run(cfg, device)
    columns = base_columns(cfg, len(classes))
    optimizer, schedule = build_optimizer(cfg, model, cfg.epochs)
    state = {"epoch": 0, "step_in_epoch": 0, "step": 0, "best_val": -1.0, "train_seconds": 0.0, "train_images": 0}
    if resume:
        model.load_trainable_state(checkpoint.load_tensors(out / "last"))
        saved = checkpoint.load_trainer_state(out / "last")
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        state = saved["state"]
        torch.set_rng_state(saved["rng"])
    ddp = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                     else None) if world > 1 else model)
    log = MetricsLog(out / "metrics.jsonl", resume_step=state["step"] if resume else None) if main_rank else None
    step = TrainStep(ddp, optimizer, device, columns, model.auxiliary_loss)
    why_not = graph_support(device, world, fast.host_inputs(cfg), optimizer)
    run_step, path = make_step(step, fast.cuda_graph(cfg), why_not, device)
    speed = fast.report(model, train_set, path, why_not)

    def save_last() -> None:
        if main_rank:
            checkpoint.save(out / "last", model.trainable_state(), cfg, {
                "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "state": dict(state),
                "rng": torch.get_rng_state()})

    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.json")
        log.write(step=state["step"], **speed)
    try:
        while state["epoch"] < cfg.epochs:
            epoch = state["epoch"]
            if state["step_in_epoch"] == 0 and model.mapping is not None and hasattr(model.mapping, "should_refresh") \
                    and model.mapping.should_refresh(epoch):
                refresh_mapping(model, train_set, cfg, device, progress)
            model.train()
            order = data.epoch_batches(len(train_set), cfg.batch_size, cfg.seed, epoch, start=state["step_in_epoch"],
                                       rank=rank, world_size=world)
            n_batches = (len(train_set) // cfg.batch_size if world > 1 else -(-len(train_set) // cfg.batch_size))
            bar = tqdm(data.batches(train_set, order, cfg.num_workers), total=n_batches, initial=state["step_in_epoch"],
                       desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
            start = time.perf_counter()
            for images, labels in bar:
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                run_step(images, labels)
                state["step_in_epoch"] += 1
                state["step"] += 1
                state["train_images"] += images.shape[0] * world
                if state["step"] % cfg.log_every == 0 and main_rank:
                    value = step.read_loss()
                    bar.set_postfix(loss=f"{value:.4f}")
                    log.write(step=state["step"], epoch=epoch, loss=value, lr=optimizer.param_groups[0]["lr"])
                stop = cfg.max_steps is not None and state["step"] >= cfg.max_steps
                if stop or (cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0):
                    state["train_seconds"] += time.perf_counter() - start
                    start = time.perf_counter()
                    save_last()
                if stop:
                    return {"stopped_at_step": state["step"]}
            state["train_seconds"] += time.perf_counter() - start
            schedule.step()
            state["epoch"], state["step_in_epoch"] = epoch + 1, 0
            val_acc = evaluate(model, val_set, cfg.batch_size, device, cfg.num_workers, "validation", progress,
                               columns)
            if main_rank:
                log.write(step=state["step"], epoch=epoch + 1, val_acc=val_acc)
                if val_acc > state["best_val"]:
                    state["best_val"] = val_acc
                    checkpoint.save(out / "best", model.trainable_state(), cfg)
            save_last()
    except KeyboardInterrupt:
        save_last()
        raise
    results = {
        "method": cfg.method, "model": cfg.model, "data": cfg.data, "epochs": cfg.epochs, "steps": state["step"],
        "best_val_acc": state["best_val"]}
    if cfg.base_to_novel:  # ProVP's protocol: the final epoch's prompts, no selection on held-out data
        results.update(base_to_novel_accuracy(model, test_set, len(classes), cfg, device, progress))
    else:
        model.load_trainable_state(checkpoint.load_tensors(out / "best"))
        results["test_acc"] = evaluate(model, test_set, cfg.batch_size, device, cfg.num_workers, "test", progress)
    results.update({
        "trainable_params": model.num_trainable,
        "train_images_per_s": state["train_images"] / max(state["train_seconds"], 1e-9), **speed,
    })
    if main_rank:
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        if cfg.method in PIXEL_METHODS:
            model.prompter.to_image().save(out / "prompt.png")
        plot(out / "metrics.jsonl", out / "training.png")
    return results


def evaluate_checkpoint(directory: str | Path, data_name: str | None = None, progress: bool = True) -> dict:
    """Test accuracy of a saved prompt (``vpfast eval``), on its own dataset or on ``data_name``."""
    cfg = TrainConfig.load(Path(checkpoint.resolve(directory)) / checkpoint.CONFIG)
    if data_name:
        cfg.data = data_name
    cfg = cfg.resolved()
    device = _device(cfg)
    model, (_, _, test_set), classes = build_run(cfg, device)
    model.load_trainable_state(checkpoint.load_tensors(directory))
    if cfg.base_to_novel:
        return {"checkpoint": str(directory), "data": cfg.data,
                **base_to_novel_accuracy(model, test_set, len(classes), cfg, device, progress)}
    acc = evaluate(model, test_set, cfg.batch_size, device, cfg.num_workers, "test", progress)
    return {"checkpoint": str(directory), "data": cfg.data, "test_acc": acc}
