"""Optional dependencies of the backbone adapters, imported only when a builder needs them."""

import importlib
from types import ModuleType


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or fail with the pip command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"this backbone needs the '{module}' package: pip install 'vpfast[{extra}]'") from error
