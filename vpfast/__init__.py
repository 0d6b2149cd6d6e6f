"""vpfast: fast visual prompting (EVP, pixel prompters, PGN, ProVP-Ref, Pro-tuning) of frozen models."""

from vpfast import _extension
from vpfast.version import __version__

# Load vpfast._C (registers its ops) before anything dispatches; warns once if it is unavailable.
_extension.status()

from vpfast import ops  # noqa: E402
from vpfast.optim import NormalizedSGD, cosine_per_epoch  # noqa: E402
from vpfast.pgn import PGN  # noqa: E402
from vpfast.pretrained import from_hub, from_pretrained, push_to_hub, save_pretrained  # noqa: E402
from vpfast.prompt_tokens import PromptedViT  # noqa: E402
from vpfast.prompters import (  # noqa: E402
    CLIP_MEAN,
    CLIP_STD,
    Diversity,
    EVPrompter,
    PadPrompter,
    PatchPrompter,
    PrompterOptions,
)
from vpfast.protuning import ProTuning  # noqa: E402
from vpfast.provp import ProVP  # noqa: E402

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "Diversity",
    "EVPrompter",
    "NormalizedSGD",
    "PGN",
    "PadPrompter",
    "PatchPrompter",
    "PrompterOptions",
    "ProTuning",
    "ProVP",
    "PromptedViT",
    "__version__",
    "cosine_per_epoch",
    "from_hub",
    "from_pretrained",
    "ops",
    "push_to_hub",
    "save_pretrained",
]
