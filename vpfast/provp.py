"""ProVP-Ref and VPT: deep prompt tokens in a frozen ViT, and ProVP's contrastive feature re-formation loss.

``ProVP(model, num_prompts=M, alpha, deep)`` runs an open_clip or timm ViT with M learned prompt tokens per
layer (docs/methods.md, VPT and ProVP-Ref; docs/backbones.md), without modifying the model's code or weights:

- layer 0: P_0 is inserted right after the prefix tokens (the class token; timm register tokens too), after
  the pre-norm (open_clip ``ln_pre``, timm ``norm_pre``), with no positional embedding;
- before each block l >= 1 (``deep=True``) the prompt slots become ``alpha * O_{l-1} + (1 - alpha) * P_l``,
  O_{l-1} being block l-1's outputs at those slots. ProVP: alpha = 0.01; alpha = 0 is VPT-deep (slots
  replaced); ``deep=False`` is VPT-shallow (P_0 only). The blend is out of place (``torch.cat``), never a
  slice assignment, so a block recomputed by gradient checkpointing sees its saved input unchanged;
- the prompts are removed before the final norm and pooling, so CLS, average pooling and the token
  outputs read the image tokens only.

All hooks are registered once and stay while the ProVP lives (``remove_hooks()`` takes them off), as in
``PromptedViT``: hooks that stay put are traced by ``torch.compile`` (``fullgraph=True`` compiles a ProVP or a
``ProVPClassifier`` in one graph), where hooks added per call are not. Layer 0's insertion and the removal act
only during a prompted call of this ProVP. The blend hooks on blocks 1..L-1 act on any sequence that carries
M prompts (the model's own token count + M), also when a checkpointed block re-runs its hooks during
backward, after the forward has returned; so the model called on its own, or with prompts disabled, is
unaffected. Wrap one model in one ProVP at a time.

Init: U(+-sqrt(6 / (3 * p^2 + d))) with the model's real patch size p (the released ProVP code hard-codes
p = 14 on a /16 model: +-0.0665 for d = 768 instead of +-0.0625). ``num_prompts=0`` adds no hook: the output
equals the frozen model's bit for bit. The state dict holds the prompts only (the frozen weights are the
ones the ProVP was built around), so checkpoints stay small.

No fused kernel: the blend is a (B, M, d) multiply-add and a concatenation next to a transformer block
that costs O(B N d^2); on ViT-B/16 with M = 16 it is well under 1 % of a layer's time and memory traffic,
so fusing it would not show in a training step. PyTorch's elementwise ops (and torch.compile) are enough.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from vpfast.backbones.frozen import FrozenClassifier, compile_function
from vpfast.prompt_tokens import _check_open_clip_version, _unwrap, vit_family


def reformation_loss(prompted: torch.Tensor, frozen: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """ProVP's contrastive feature re-formation: in-batch InfoNCE, prompted features against frozen ones.

    ``CE(cos(f_p, f_0) / temperature, arange(B))`` over rows, with cos the (B, B) cosine similarities of
    the prompted features (rows) and the frozen features of the same images (columns). The released code
    uses one direction and no temperature (1.0). Computed in float32 (or float64 for float64 inputs).
    """
    if prompted.dim() != 2 or prompted.shape != frozen.shape:
        raise ValueError(f"prompted and frozen features must both be (B, D) of the same shape, "
                         f"got {tuple(prompted.shape)} and {tuple(frozen.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = torch.promote_types(prompted.dtype, torch.float32)
    similarity = F.normalize(prompted.to(dtype), dim=-1) @ F.normalize(frozen.to(dtype), dim=-1).t()
    return F.cross_entropy(similarity / temperature, torch.arange(prompted.shape[0], device=prompted.device))


class ProVP(nn.Module):
    """A frozen open_clip or timm ViT with (deep) prompt tokens: ProVP-Ref, VPT-deep or VPT-shallow.

    ``model``: an open_clip ``VisionTransformer`` (a CLIP's ``.visual``), a timm ``VisionTransformer``, or a
    ``FrozenClassifier`` around either (``from_open_clip``, ``from_timm``). ``forward`` gives the model's
    logits (CLIP: the cached zero-shot head on the image features; timm: its own head; a bare open_clip
    tower: its image features); ``features`` gives the image features before the head.
    """

    def __init__(self, model: nn.Module, num_prompts: int = 16, alpha: float = 0.01, deep: bool = True) -> None:
        super().__init__()
        if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts < 0:
            raise ValueError(f"num_prompts must be an integer >= 0, got {num_prompts!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be a number in [0, 1] (0: VPT-deep, 0.01: ProVP), got {alpha!r}")
        if not isinstance(deep, bool):
            raise ValueError(f"deep must be True or False, got {deep!r}")
        vit = _unwrap(model)
        family = vit_family(vit)
        if family not in ("open_clip", "timm"):
            raise TypeError(f"ProVP supports open_clip.transformer.VisionTransformer and "
                            f"timm.models.vision_transformer.VisionTransformer (bare or in a FrozenClassifier), "
                            f"got {type(vit).__module__}.{type(vit).__qualname__}")
        if family == "open_clip":
            _check_open_clip_version()
            blocks = list(vit.transformer.resblocks)
            self._seq_dim = 1 if getattr(vit.transformer, "batch_first", True) else 0  # inside the transformer
            self._start, self._base_tokens = 1, vit.positional_embedding.shape[0]
            patch, pre_norm, strip_at = vit.conv1.kernel_size, vit.ln_pre, vit.transformer
        else:
            if getattr(vit, "dynamic_img_size", False):
                raise ValueError("ProVP needs a fixed token count: timm models with dynamic_img_size=True are "
                                 "not supported")
            blocks = list(vit.blocks)
            self._seq_dim = 1
            self._start = vit.num_prefix_tokens
            self._base_tokens = vit.patch_embed.num_patches + vit.num_prefix_tokens
            patch, pre_norm, strip_at = vit.patch_embed.proj.kernel_size, vit.norm_pre, vit.norm
        self.model = model.requires_grad_(False).eval()
        self.family, self.num_prompts, self.alpha, self.deep = family, num_prompts, float(alpha), deep
        self._path = (vit, pre_norm, strip_at)  # a tuple: these are registered once, as parts of model
        self.dim = vit.conv1.out_channels if family == "open_clip" else vit.embed_dim
        self.patch_size = tuple(patch)
        bound = (6 / (3 * self.patch_size[0] * self.patch_size[1] + self.dim)) ** 0.5
        depth = len(blocks) if deep else 1
        self.prompts = nn.Parameter(torch.empty(depth, num_prompts, self.dim).uniform_(-bound, bound))
        self._prompting = True
        self._inserting = False  # True during a prompted call: layer 0's insertion and the removal act
        self._handles = []  # never read in forward: torch.compile cannot trace a hook handle
        self._hooked = True
        if num_prompts:
            self._handles = self._register_insertion(pre_norm, strip_at)
        if num_prompts and deep:
            self._handles += [block.register_forward_pre_hook(self._blend_hook(layer))
                              for layer, block in enumerate(blocks) if layer > 0]
        # ProVP runs the ViT's parts itself, not the FrozenClassifier's (compiled) forward: a backbone built with
        # ``compile`` has the prompted features compiled here instead.
        self._features_fn = compile_function(self._features, model.compile if isinstance(model, FrozenClassifier)
                                             else False)
        self.register_state_dict_post_hook(_drop_frozen_state)
        self.register_load_state_dict_pre_hook(_restore_frozen_state)

    @property
    def vit(self) -> nn.Module:
        """The ViT the prompts enter (``model`` itself, or the tower inside it)."""
        return self._path[0]

    @property
    def classifier(self) -> nn.Module:
        """Image features -> logits: CLIP's zero-shot head, timm's head, or the identity for a bare CLIP tower."""
        if self.family == "timm":
            return self.vit.get_classifier()
        return self.model.model.head if isinstance(self.model, FrozenClassifier) else nn.Identity()

    def train(self, mode: bool = True) -> ProVP:
        """Whatever the mode asked for, the frozen model stays in eval mode."""
        super().train(mode)
        self.model.eval()
        return self

    def remove_hooks(self) -> None:
        """Take the hooks off the model (prompted calls raise afterwards)."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._hooked = [], False

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the same module without prompts: the frozen model's features and logits."""
        previous, self._prompting = self._prompting, False
        try:
            yield
        finally:
            self._prompting = previous

    def _slots(self, prompt: torch.Tensor, like: torch.Tensor, seq_dim: int) -> torch.Tensor:
        """``prompt`` (M, d) expanded to the layout of ``like`` (batch-first or tokens-first)."""
        prompt = prompt.to(like.dtype)
        if seq_dim == 1:
            return prompt.unsqueeze(0).expand(like.shape[0], -1, -1)
        return prompt.unsqueeze(1).expand(-1, like.shape[1], -1)

    def _blend_hook(self, layer: int) -> Callable:
        start, count, dim = self._start, self.num_prompts, self._seq_dim

        def blend(module: nn.Module, args: tuple) -> tuple | None:
            tokens, *rest = args
            if tokens.shape[dim] != self._base_tokens + count:  # no prompts in this sequence
                return None
            head, previous, tail = tokens.split([start, count, tokens.shape[dim] - start - count], dim=dim)
            new = self._slots(self.prompts[layer], tokens, dim)
            if self.alpha:  # alpha = 0 (VPT-deep) replaces the slots: no gradient to the previous outputs
                new = self.alpha * previous + (1 - self.alpha) * new
            return (torch.cat([head, new, tail], dim=dim), *rest)

        return blend

    def _register_insertion(self, pre_norm: nn.Module, strip_at: nn.Module) -> list:
        """P_0 inserted after the pre-norm, all prompts removed before the final norm: while ``_inserting``."""
        start, count = self._start, self.num_prompts

        def insert(module: nn.Module, args: tuple, tokens: torch.Tensor) -> torch.Tensor | None:
            if not self._inserting:
                return None
            slots = self._slots(self.prompts[0], tokens, 1)
            return torch.cat([tokens[:, :start], slots, tokens[:, start:]], dim=1)

        def strip(tokens: torch.Tensor) -> torch.Tensor:
            return torch.cat([tokens[:, :start], tokens[:, start + count:]], dim=1)

        def strip_output(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            return strip(out) if self._inserting else None

        def strip_input(module: nn.Module, args: tuple) -> tuple | None:
            return (strip(args[0]), *args[1:]) if self._inserting else None

        handles = [pre_norm.register_forward_hook(insert)]
        if self.family == "open_clip":  # the transformer's output is batch-first in every open_clip >= 2.26
            handles.append(strip_at.register_forward_hook(strip_output))
        else:
            handles.append(strip_at.register_forward_pre_hook(strip_input))
        return handles

    def _autocast(self, images: torch.Tensor):
        dtype = getattr(self.model, "autocast_dtype", None)
        return nullcontext() if dtype is None else torch.autocast(images.device.type, dtype=dtype)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Image features of normalized ``images`` (CLIP: the projected embedding; timm: the pre-logits)."""
        return self._features_fn(images)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        if self._prompting and self.num_prompts > 0 and not self._hooked:
            raise RuntimeError("this ProVP's hooks were removed (remove_hooks): it cannot prompt the model")
        self._inserting = self._prompting and self.num_prompts > 0
        try:
            with self._autocast(images):
                if self.family == "open_clip":
                    out = self.vit(images)
                    out = out[0] if isinstance(out, tuple) else out  # output_tokens=True: (pooled, tokens)
                else:
                    out = self.vit.forward_head(self.vit.forward_features(images), pre_logits=True)
        finally:
            self._inserting = False
        return out if getattr(self.model, "autocast_dtype", None) is None else out.float()

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The classifier applied to ``features`` (under the model's autocast, if any, with float32 out)."""
        if getattr(self.model, "autocast_dtype", None) is None:
            return self.classifier(features)
        with self._autocast(features):
            return self.classifier(features).float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of normalized ``images`` at the model's input size, prompted unless ``disabled()``."""
        return self.logits(self.features(images))

    def extra_repr(self) -> str:
        return (f"family={self.family}, num_prompts={self.num_prompts}, alpha={self.alpha}, deep={self.deep}, "
                f"dim={self.dim}, patch_size={self.patch_size}")


def _drop_frozen_state(module: ProVP, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "model.")]:
        del state_dict[key]


def _restore_frozen_state(module: ProVP, state_dict: dict, prefix: str, *args) -> None:
    """Loading a prompts-only state: the frozen model keeps (is given back) its own tensors."""
    for key, value in module.model.state_dict(keep_vars=True).items():
        state_dict.setdefault(prefix + "model." + key, value)


class ProVPClassifier(nn.Module):
    """The training adapter: logits of normalized images, plus ProVP's re-formation loss of the last forward.

    In training mode (with gradients on and ``ref_weight`` > 0) each forward also runs the same ProVP with
    prompts disabled under no_grad, for the frozen features of the same images; ``auxiliary_loss()`` is then
    ``ref_weight * reformation_loss(prompted, frozen, ref_temperature)``, else None (VPT, evaluation).
    """

    def __init__(self, provp: ProVP, ref_weight: float = 1.0, ref_temperature: float = 1.0) -> None:
        super().__init__()
        if not ref_weight >= 0:
            raise ValueError(f"ref_weight must be >= 0, got {ref_weight}")
        if not ref_temperature > 0:
            raise ValueError(f"ref_temperature must be > 0, got {ref_temperature}")
        self.provp, self.ref_weight, self.ref_temperature = provp, float(ref_weight), float(ref_temperature)
        self._auxiliary: torch.Tensor | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.provp.features(images)
        self._auxiliary = None
        if self.training and self.ref_weight > 0 and torch.is_grad_enabled():
            with torch.no_grad(), self.provp.disabled():
                frozen = self.provp.features(images)
            self._auxiliary = self.ref_weight * reformation_loss(features, frozen, self.ref_temperature)
        return self.provp.logits(features)

    def auxiliary_loss(self) -> torch.Tensor | None:
        """The weighted re-formation loss of the last training forward, or None."""
        return self._auxiliary

    def extra_repr(self) -> str:
        return f"ref_weight={self.ref_weight}, ref_temperature={self.ref_temperature}"
