"""The training configuration: one dataclass, saved as JSON with every checkpoint.

Defaults reproduce the released recipes (METHODS.md): EVP trains a zero-initialized frame
(30 px of 224 around a 164 image) with NormalizedSGD at lr 70, per-epoch cosine, batch 256,
1000 epochs, gradient norm over the whole canvas; the Bahng pad/patch prompters train with
SGD lr 40, momentum 0.9 and cosine; PGN (ViT backbones only) trains its generator and token
library with SGD lr 0.1, momentum 0.9, a linear warmup over half the epochs, then cosine to lr/100.
Pro-tuning has no released code: its prompt blocks train with Adam at lr 1e-3 and cosine, our
choice, not the paper's [NOT VERIFIED]. ProVP-Ref and VPT train their deep prompts with SGD lr 0.1,
momentum 0.9 and cosine; the rest of their recipe is in vpfast/train/provp.py.
Every field can be overridden.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from vpfast.ops.compose import check_choice
from vpfast.train import fast, provp

METHODS = ("evp", "pad", "patch", "pgn", "protuning", "provp", "vpt")
PIXEL_METHODS = ("evp", "pad", "patch")  # methods whose prompt is a picture; the others see normalized images
OPTIMIZERS = ("normalized-sgd", "sgd", "adam")
LABEL_MAPPINGS = ("first-k", "frequency")

# method -> (optimizer, lr, momentum)
RECIPES = {"evp": ("normalized-sgd", 70.0, 0.0), "pad": ("sgd", 40.0, 0.9), "patch": ("sgd", 40.0, 0.9),
           "pgn": ("sgd", 0.1, 0.9),
           # Pro-tuning: no released recipe; Adam at 1e-3 for the zero-initialized blocks is our choice [NOT VERIFIED]
           "protuning": ("adam", 1e-3, 0.0),
           "provp": ("sgd", 0.1, 0.9), "vpt": ("sgd", 0.1, 0.9)}  # more of their recipe: vpfast/train/provp.py


@dataclass
class TrainConfig:
    """Everything a run needs; ``None`` fields take the method's or the backbone's default."""

    method: str = "evp"
    model: str = "open_clip:ViT-B-32"  # open_clip:NAME | timm:NAME | torchvision:NAME
    pretrained: str | None = "openai"  # open_clip tag, timm True/packaged name, torchvision weights enum
    model_cfg: dict | None = None  # open_clip config overrides (tiny test models)
    data: str = "mnist"  # packaged name | torchvision:NAME | an image folder
    data_root: str = "data"
    download: bool = False
    templates: list[str] = field(default_factory=lambda: ["this is a photo of a {}"])
    image_size: int | None = None  # canvas S; default: the backbone's input size
    pad: int | None = None  # frame width; default 30 / 224 of S
    patch: int | None = None  # patch side for the patch prompter; default 30 / 224 of S
    mode: str = "bilinear"
    antialias: bool = False
    diversity: float = 0.0  # probability of per-sample random resize/placement (0: off)
    grad_region: str | None = None  # default: "canvas" for EVP (its released norm), else "prompt"
    optimizer: str | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None  # default: 5e-4 for ProVP, 1e-4 for VPT, else 0
    epochs: int = 1000
    warmup_epochs: int | None = None  # linear warmup (default: half the epochs for PGN, else none)
    min_lr_ratio: float | None = None  # cosine floor as a fraction of lr (default: 0.01 for PGN, else 0)
    num_prompts: int = 16  # PGN: prompt tokens per image; ProVP/VPT: prompt tokens per layer
    library_size: int = 256  # PGN: tokens in the library
    block_ratio: int = 4  # Pro-tuning: prompt block hidden width = stage width / block_ratio
    vit_stages: int = 4  # Pro-tuning on ViTs: groups of transformer blocks, one prompt block each
    alpha: float | None = None  # ProVP: share of the previous layer's prompt outputs (default 0.01; VPT: 0)
    deep: bool = True  # ProVP/VPT: prompts in every layer (--no-deep: VPT-shallow, layer 0 only)
    ref_weight: float | None = None  # ProVP: weight of the feature re-formation loss (default 1.0; VPT: 0)
    ref_temperature: float = 1.0  # ProVP: temperature of the re-formation InfoNCE (released: 1)
    shots: int | None = None  # few-shot protocol: K training images per class, drawn with the seed
    base_to_novel: bool = False  # train on the first half of the classes; report base, novel, harmonic mean
    batch_size: int = 256
    label_mapping: str = "frequency"  # ImageNet classifiers only; CLIP uses its zero-shot head
    mapping_refresh: int | None = None  # epochs between frequency-mapping refreshes (None: once)
    mapping_samples: int = 2000  # training images counted for the frequency mapping
    val_fraction: float = 0.1
    train_limit: int | None = None  # use only this many training images (quick runs)
    test_limit: int | None = None
    seed: int = 0
    amp: str | None = None  # "bf16": backbone under bfloat16 autocast
    precision: str = "auto"  # auto | fp32 | bf16: frozen weights in bf16 (auto: bf16 on CUDA, fp32 on the CPU)
    compile: str = "auto"  # auto | on | off: torch.compile the frozen backbone (auto: on with CUDA)
    cuda_graph: str = "auto"  # auto | on | off: the training step in CUDA graphs (auto: where supported)
    data_device: str = "auto"  # auto | cpu | cuda: where in-memory datasets live (auto: the GPU if they fit)
    num_workers: int = 2
    log_every: int = 10
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints (0: at epoch ends only)
    max_steps: int | None = None  # stop after this many steps in total (the checkpoint allows resuming)
    out: str = "runs/evp"
    device: str | None = None

    def resolved(self) -> TrainConfig:
        """A copy with the method's recipe filled in and every choice checked."""
        cfg = dataclasses.replace(self)
        check_choice("method", cfg.method, METHODS)
        provp.resolve(cfg)
        optimizer, lr, momentum = RECIPES[cfg.method]
        cfg.optimizer = cfg.optimizer or optimizer
        cfg.lr = lr if cfg.lr is None else cfg.lr
        cfg.momentum = momentum if cfg.momentum is None else cfg.momentum
        cfg.grad_region = cfg.grad_region or ("canvas" if cfg.method == "evp" else "prompt")
        pgn = cfg.method == "pgn"
        cfg.warmup_epochs = (cfg.epochs // 2 if pgn else 0) if cfg.warmup_epochs is None else cfg.warmup_epochs
        cfg.min_lr_ratio = (0.01 if pgn else 0.0) if cfg.min_lr_ratio is None else cfg.min_lr_ratio
        if not 0 <= cfg.warmup_epochs < cfg.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs) = [0, {cfg.epochs}), got {cfg.warmup_epochs}")
        check_choice("optimizer", cfg.optimizer, OPTIMIZERS)
        check_choice("label_mapping", cfg.label_mapping, LABEL_MAPPINGS)
        check_choice("amp", cfg.amp, (None, "bf16"))
        fast.check(cfg)
        for name in ("epochs", "batch_size", "log_every", "block_ratio", "vit_stages"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
        if not 0 <= cfg.diversity <= 1:
            raise ValueError(f"diversity must be a probability in [0, 1], got {cfg.diversity}")
        if cfg.model.split(":", 1)[0] not in ("open_clip", "timm", "torchvision") or ":" not in cfg.model:
            raise ValueError(f"model must be open_clip:NAME, timm:NAME or torchvision:NAME, got {cfg.model!r}")
        return cfg

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls(**json.loads(Path(path).read_text()))
