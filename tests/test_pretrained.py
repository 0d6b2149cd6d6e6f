"""Shareable prompts: save_pretrained / from_pretrained (safetensors + JSON card) for every method, the run's
``<out>/pretrained``, and the Hub round trip against a local folder."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import vpfast
from vpfast.backbones import FirstK, FrequencyMapping
from vpfast.pgn import PGN
from vpfast.pretrained import CARD, FORMAT, TENSORS, from_pretrained, save_pretrained
from vpfast.prompters import Diversity, EVPrompter, PadPrompter, PatchPrompter

pytestmark = pytest.mark.cpu

S = 32


def _randomized(module: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Random values in every trained parameter (a frozen backbone inside stays as it is)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module


def _modules() -> dict[str, tuple[str, torch.nn.Module]]:
    return {
        "evp": ("evp", _randomized(EVPrompter(image_size=S, pad=4, seed=3))),
        "pad": ("pad", _randomized(PadPrompter(image_size=S, pad=3, mode="bilinear", antialias=False,
                                               diversity=Diversity(p=0.5), mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4)))),
        "patch": ("patch", _randomized(PatchPrompter(image_size=S, patch=5, random=True, seed=7,
                                                     out_dtype=torch.bfloat16))),
        "pgn": ("pgn", _randomized(PGN(num_prompts=3, library_size=8, dim=16, input_size=24, tau=0.5))),
    }


def _images() -> torch.Tensor:
    return torch.randint(0, 256, (2, 3, 20, 27), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)


def _outputs(module: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(images.float() / 255) if isinstance(module, PGN) else module(images)


FRESH_PROCESS = """
import sys
import torch
from safetensors.torch import load_file, save_file
import vpfast
images = load_file(sys.argv[1])["images"]
outputs = {}
for name in sys.argv[3:]:
    loaded = vpfast.from_pretrained(sys.argv[2] + "/" + name)
    module = loaded.module
    with torch.no_grad():
        outputs[name] = module(images.float() / 255) if loaded.card["method"] == "pgn" else module(images)
        if loaded.card["method"] == "patch":  # the random location comes from the saved generator state
            outputs[name + ".train"] = module.train()(images)
save_file(outputs, sys.argv[1] + ".out")
"""


def test_every_pixel_prompter_and_pgn_loads_in_a_fresh_process_with_identical_outputs(tmp_path):
    modules, images = _modules(), _images()
    for name, (method, module) in modules.items():
        save_pretrained(module, tmp_path / name, method=method, class_names=["a", "b"], metrics={"test_acc": 0.5})
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == sorted([CARD, TENSORS])  # no pickle
    save_file({"images": images}, str(tmp_path / "images.safetensors"))
    subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "images.safetensors"), str(tmp_path),
                    *modules], check=True, cwd=tmp_path)
    got = load_file(str(tmp_path / "images.safetensors.out"))
    for name, (_, module) in modules.items():
        module.eval()
        assert torch.equal(got[name], _outputs(module, images)), name
    assert torch.equal(got["patch.train"], modules["patch"][1].train()(images))


def test_the_card_says_what_the_prompt_is(tmp_path):
    evp = EVPrompter(image_size=S, pad=4)
    mapping = FrequencyMapping(1000, 3)
    mapping.mapping.copy_(torch.tensor([7, 3, 999]))
    save_pretrained(evp, tmp_path, method="evp", mapping=mapping, class_names=["x", "y", "z"],
                    backbone={"model": "timm:resnet18", "pretrained": "true"}, metrics={"test_acc": 0.25})
    card = json.loads((tmp_path / CARD).read_text())
    assert card["format"] == FORMAT and card["vpfast_version"] == vpfast.__version__
    assert (card["method"], card["kind"], card["canvas_size"], card["inner_size"]) == ("evp", "pixel", S, S - 8)
    assert card["resize"] == {"mode": "bicubic", "antialias": True}
    assert card["mean"] == pytest.approx(list(vpfast.CLIP_MEAN)) and card["std"] == pytest.approx(list(vpfast.CLIP_STD))
    assert card["backbone"] == {"model": "timm:resnet18", "pretrained": "true"}
    assert card["class_names"] == ["x", "y", "z"] and card["metrics"] == {"test_acc": 0.25}
    assert card["label_mapping"] == {"kind": "frequency", "num_source": 1000, "num_target": 3}
    loaded = from_pretrained(tmp_path)
    assert torch.equal(loaded.mapping.mapping, torch.tensor([7, 3, 999]))
    assert loaded.module.diversity == Diversity(p=0.0, flip=True) and not loaded.module.training
    save_pretrained(evp, tmp_path / "k", method="evp", mapping=FirstK(4))
    assert from_pretrained(tmp_path / "k").mapping.k == 4


def _tiny_vit_backbone():
    timm = pytest.importorskip("timm")
    from vpfast.backbones import FrozenClassifier

    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2,
                                                           num_heads=2, num_classes=10)
    return FrozenClassifier(vit, input_size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, num_classes=10)


@pytest.mark.parametrize("method", ["provp", "protuning"])
def test_methods_inside_the_backbone_load_onto_it(method, tmp_path):
    from vpfast.protuning import ProTuningAdapter
    from vpfast.provp import ProVP, ProVPClassifier

    backbone = _tiny_vit_backbone()
    if method == "provp":
        adapter = ProVPClassifier(ProVP(backbone, num_prompts=3, alpha=0.2), ref_weight=0.5)
    else:
        adapter = ProTuningAdapter(backbone, ratio=4, vit_stages=2)
    _randomized(adapter)
    save_pretrained(adapter, tmp_path, method=method)
    saved = load_file(str(tmp_path / TENSORS))
    assert sum(v.numel() for v in saved.values()) == sum(p.numel() for p in adapter.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match=rf"a {method} prompt lives inside its backbone: pass backbone="):
        from_pretrained(tmp_path)
    fresh_backbone = _tiny_vit_backbone()
    loaded = from_pretrained(tmp_path, backbone=fresh_backbone)
    images = torch.randn(2, 3, 32, 32)
    adapter.eval()
    with torch.no_grad():
        assert torch.equal(loaded.module(images), adapter(images))


def test_bad_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"is not a shareable vpfast prompt: vpfast.json is missing"):
        from_pretrained(tmp_path)
    save_pretrained(EVPrompter(image_size=S, pad=4), tmp_path, method="evp")
    card = json.loads((tmp_path / CARD).read_text())
    (tmp_path / CARD).write_text(json.dumps({**card, "format": "other"}))
    with pytest.raises(ValueError, match=r"has format 'other', expected 'vpfast-prompt-1'"):
        from_pretrained(tmp_path)
    (tmp_path / CARD).write_text(json.dumps({**card, "method": "nope"}))
    with pytest.raises(ValueError, match=r"method must be one of \('evp', .*got 'nope'"):
        from_pretrained(tmp_path)
    (tmp_path / CARD).write_text(json.dumps(card))
    save_file({"module.prompt": torch.zeros(3, S, S)}, str(tmp_path / TENSORS))
    with pytest.raises(ValueError, match=r"does not fit the card's evp settings: unexpected keys \[\], missing keys "
                                         r"\['_extra_state'\]"):
        from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"a pixel prompt is a EVPrompter or PadPrompter or PatchPrompter, got Linear"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path / "x", method="evp")
    with pytest.raises(ValueError, match=r"a pgn prompt is a PGN, got EVPrompter"):
        save_pretrained(EVPrompter(image_size=S, pad=4), tmp_path / "x", method="pgn")


@pytest.mark.parametrize("method, extra", [("evp", {}), ("pgn", dict(num_prompts=2, library_size=8))])
def test_train_writes_the_shareable_prompt_of_its_best_checkpoint(method, extra, tmp_path):
    from test_train import tiny
    from vpfast.train import checkpoint
    from vpfast.train.loop import build_run, train

    cfg = tiny(tmp_path / "run", epochs=1, method=method, **extra)
    results = train(cfg, progress=False)
    loaded = from_pretrained(tmp_path / "run" / "pretrained")
    card = loaded.card
    inner = 24 if method == "evp" else None  # pad round(30 * 32 / 224) = 4
    assert (card["method"], card["canvas_size"], card["inner_size"]) == (method, 32, inner)
    assert card["resize"] == {"mode": "bicubic", "antialias": True}
    assert card["backbone"] == {"model": "open_clip:ViT-B-32", "pretrained": None}
    assert card["class_names"][:2] == ["zero", "one"] and card["metrics"]["test_acc"] == results["test_acc"]
    model, (_, _, test_set), _ = build_run(cfg.resolved(), torch.device("cpu"))
    model.load_trainable_state(checkpoint.load_tensors(tmp_path / "run" / "best"))
    model.eval()
    images = test_set.images[:4]
    with torch.no_grad():
        assert torch.equal(loaded.classifier(model.backbone)(images), model(images))


def test_hub_push_and_pull_through_a_local_folder(tmp_path, monkeypatch):
    """huggingface_hub's HfApi and snapshot_download, redirected to a folder: vpfast's calls, offline."""
    hub = pytest.importorskip("huggingface_hub")
    remote = tmp_path / "hub"
    calls = []

    class LocalApi:
        def __init__(self, token=None):
            self.token = token

        def create_repo(self, repo_id, repo_type, private, exist_ok):
            calls.append(("create", repo_id, repo_type, private))
            (remote / repo_id).mkdir(parents=True, exist_ok=exist_ok)

        def upload_folder(self, folder_path, repo_id, repo_type, allow_patterns, commit_message):
            calls.append(("upload", repo_id, tuple(allow_patterns)))
            for name in allow_patterns:
                shutil.copy(Path(folder_path) / name, remote / repo_id / name)
            return f"https://huggingface.co/{repo_id}/commit/local"

    def snapshot_download(repo_id, repo_type, revision, allow_patterns, token):
        calls.append(("download", repo_id, revision, tuple(allow_patterns)))
        local = tmp_path / "cache" / repo_id
        shutil.copytree(remote / repo_id, local)
        return str(local)

    monkeypatch.setattr(hub, "HfApi", LocalApi)
    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    evp = _randomized(EVPrompter(image_size=S, pad=4))
    save_pretrained(evp, tmp_path / "prompt", method="evp")
    (tmp_path / "prompt" / "notes.txt").write_text("not uploaded")
    assert vpfast.push_to_hub(tmp_path / "prompt", "me/evp-digits").endswith("/commit/local")
    assert sorted(p.name for p in (remote / "me/evp-digits").iterdir()) == sorted([CARD, TENSORS])
    loaded = vpfast.from_hub("me/evp-digits", revision="main")
    images = _images()
    with torch.no_grad():
        assert torch.equal(loaded.module(images), evp.eval()(images))
    assert [c[0] for c in calls] == ["create", "upload", "download"] and calls[2][2] == "main"


def test_a_generator_saved_by_hand_says_how_its_input_was_prepared(tmp_path):
    pgn = _randomized(PGN(num_prompts=2, library_size=4, dim=48, input_size=None))
    save_pretrained(pgn, tmp_path / "bare", method="pgn")
    with pytest.raises(ValueError, match=r"does not say how the images were normalized and resized"):
        from_pretrained(tmp_path / "bare").classifier(_tiny_vit_backbone())
    preprocessing = {"canvas_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "mode": "bilinear", "antialias": False}
    save_pretrained(pgn, tmp_path / "full", method="pgn", preprocessing=preprocessing)
    card = json.loads((tmp_path / "full" / CARD).read_text())
    assert (card["canvas_size"], card["mean"], card["resize"]) == (32, [0.5] * 3, {"mode": "bilinear",
                                                                                   "antialias": False})
    from vpfast.prompt_tokens import PromptedViT

    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    backbone = _tiny_vit_backbone()
    normalized = (images.float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        logits = from_pretrained(tmp_path / "full").classifier(backbone)(images)
        expected = PromptedViT(backbone)(normalized, pgn.eval()(normalized))
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
