"""vpfast: fast visual prompting (EVP, pixel prompters, PGN, ProVP-Ref, Pro-tuning) of frozen models."""

from vpfast import _extension
from vpfast.version import __version__

# Load vpfast._C (registers its ops) before anything dispatches; warns once if it is unavailable.
_extension.status()

__all__ = ["__version__"]
