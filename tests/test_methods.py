"""The method registry: one consistent record per method, which the config, the demo and export read."""

from __future__ import annotations

import importlib

import pytest

from vpfast import demo, methods
from vpfast.train import config

pytestmark = pytest.mark.cpu


def test_every_record_is_complete():
    assert methods.names() == ("evp", "pad", "patch", "pgn", "protuning", "provp", "vpt")
    for name, method in methods.REGISTRY.items():
        assert method.name == name and method.kind in methods.KINDS and method.summary and method.export
        for module in method.modules:
            importlib.import_module(module)
        assert callable(method.build) and callable(method.settings) and callable(method.rebuild)
    assert methods.names("pixel") == ("evp", "pad", "patch") and methods.names("tokens") == ("pgn",)


def test_the_config_and_the_demo_read_the_registry():
    assert config.METHODS == methods.names() and config.PIXEL_METHODS == methods.names("pixel")
    shown = {name for name, m in methods.REGISTRY.items() if m.demo != "not in the demo"}
    assert shown == set(demo.METHODS) | set(demo.VIT_METHODS)


def test_unknown_methods_are_refused_by_name():
    with pytest.raises(ValueError, match=r"method must be one of \('evp', 'pad', .*\), got 'vp'"):
        methods.get("vp")
    with pytest.raises(ValueError, match=r"method must be one of .*got 'vp'"):
        config.TrainConfig(method="vp").resolved()
