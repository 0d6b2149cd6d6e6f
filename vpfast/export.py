"""``vpfast export``: a trained PGN run as pixel prompts, for deployments that accept only images.

PGN's prompts depend on the image, so the deployable piece is a module: the trained generator
followed by the patch pseudo-inverse (``vpfast.inversion.PatchInverse``), which pastes M generated
patches into the normalized image; the frozen model then runs unmodified on those pixels. The file is
one safetensors (generator weights and the inverse's tensors) with its settings in the metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from vpfast import methods
from vpfast.inversion import InvertedPrompts, PatchInverse, paste_patches, patch_inverse
from vpfast.pgn import PGN

FORMAT = "vpfast-pixel-pgn-2"


class PixelPGN(nn.Module):
    """Normalized images (B, 3, H, W) -> the same images with PGN's prompts pasted in as pixel patches."""

    def __init__(self, generator: PGN, inverse: PatchInverse) -> None:
        super().__init__()
        self.generator, self.inverse = generator.eval(), inverse

    def patches(self, images: torch.Tensor) -> InvertedPrompts:
        return self.inverse.invert(self.generator(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return paste_patches(images, self.patches(images))


def export_pixel_prompts(run: str | Path, out: str | Path | None = None) -> Path:
    """Write ``run``'s PGN (its best checkpoint) as pixel prompts to ``out`` (default ``<run>/pixel_prompts``)."""
    from vpfast.train import checkpoint
    from vpfast.train.config import TrainConfig
    from vpfast.train.loop import build_run

    run = Path(run)
    directory = checkpoint.locate(run)
    cfg = TrainConfig.load(checkpoint.config_path(directory)).resolved()
    method = methods.get(cfg.method)
    if method.kind != "tokens":  # the registry says what export does with each method
        raise ValueError(f"vpfast export turns prompt-token runs (PGN) into pixel prompts; {directory} is a run of "
                         f"method {cfg.method!r}, for which export does {method.export}")
    cfg.device = "cpu"
    model, _, _ = build_run(cfg, torch.device("cpu"))
    model.load_trainable_state(checkpoint.load_tensors(directory))
    vit = model.vit
    inverse = patch_inverse(vit, cfg.num_prompts)
    tensors = {f"generator.{k}": v.contiguous() for k, v in model.tokens.state_dict().items()}
    tensors.update({"inverse.matrix": inverse.matrix, "inverse.offset": inverse.offset,
                    "inverse.positions": inverse.positions})
    settings = {"format": FORMAT, "model": cfg.model, "pretrained": cfg.pretrained, "num_prompts": cfg.num_prompts,
                "library_size": cfg.library_size, "dim": vit.dim, "input_size": model.tokens.input_size,
                "generator": model.tokens.generator, "patch_shape": list(inverse.patch_shape),
                "exact": inverse.exact, "image_size": model.prompter.size,
                "mean": model.prompter.mean.tolist(), "std": model.prompter.std.tolist()}
    target = Path(out) if out is not None else run / "pixel_prompts.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target), metadata={"vpfast": json.dumps(settings)})
    return target


def load_pixel_prompts(path: str | Path) -> tuple[PixelPGN, dict]:
    """(the PixelPGN module, its settings) from a file ``export_pixel_prompts`` wrote."""
    with safe_open(str(path), "pt") as handle:
        settings = json.loads((handle.metadata() or {}).get("vpfast", "{}"))
    if settings.get("format") != FORMAT:
        raise ValueError(f"{path} is not a vpfast pixel-prompt file (format {settings.get('format')!r}, "
                         f"expected {FORMAT!r})")
    tensors = load_file(str(path))
    generator = PGN(settings["num_prompts"], settings["library_size"], settings["dim"],
                    generator=settings["generator"], input_size=settings["input_size"])
    generator.load_state_dict({k[len("generator."):]: v for k, v in tensors.items() if k.startswith("generator.")})
    inverse = PatchInverse(tensors["inverse.matrix"], tensors["inverse.offset"], tensors["inverse.positions"],
                           tuple(settings["patch_shape"]))
    return PixelPGN(generator, inverse), settings


@torch.no_grad()
def pixel_prompt_gap(run: str | Path, path: str | Path | None = None, batch_size: int = 256) -> dict:
    """Test accuracy of ``run``'s PGN with latent prompts and as exported pixel prompts, and their agreement.

    Both use the best checkpoint on the run's test split; the pixel model sees only pixels (the frozen
    backbone runs unmodified), so the gap is the image content the pasted patches cover plus the
    inversion residual (zero where the patch embedding is invertible).
    """
    from vpfast.train import checkpoint
    from vpfast.train.config import TrainConfig
    from vpfast.train.data import batches, epoch_batches
    from vpfast.train.loop import build_run

    run = Path(run)
    pixel, _ = load_pixel_prompts(path if path is not None else run / "pixel_prompts.safetensors")
    cfg = TrainConfig.load(checkpoint.config_path(run / "best")).resolved()
    model, (_, _, test_set), _ = build_run(cfg, torch.device("cpu"))
    model.load_trainable_state(checkpoint.load_tensors(run / "best"))
    model.eval()
    latent_hits = pixel_hits = agree = 0
    residuals = []
    order = epoch_batches(len(test_set), batch_size, seed=0, epoch=0, shuffle=False)
    for images, labels in batches(test_set, order):
        latent = model(images).argmax(1)
        x = model.prompter(images)
        inverted = pixel.patches(x)
        logits = model.backbone(paste_patches(x, inverted))
        predicted = (logits if model.mapping is None else model.mapping(logits)).argmax(1)
        latent_hits += int((latent == labels).sum())
        pixel_hits += int((predicted == labels).sum())
        agree += int((latent == predicted).sum())
        residuals.append(inverted.residual.flatten())
    n = len(test_set)
    return {"latent_acc": latent_hits / n, "pixel_acc": pixel_hits / n, "top1_agreement": agree / n,
            "mean_residual": torch.cat(residuals).double().mean().item(), "test_images": n}
