"""The vpfast version: the single source read by setup.py, pyproject.toml and ``vpfast.__version__``."""

__version__ = "0.1.0"
