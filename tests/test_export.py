"""vpfast export: a trained PGN run as pixel prompts that reproduce the inverted prompts exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from test_train import tiny
from vpfast.cli import main
from vpfast.export import load_pixel_prompts
from vpfast.inversion import invert_prompts, paste_patches
from vpfast.prompt_tokens import PromptedViT
from vpfast.train import checkpoint
from vpfast.train.loop import build_run, train

pytestmark = pytest.mark.cpu


@pytest.fixture(scope="module")
def pgn_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pgn")
    train(tiny(out, method="pgn", num_prompts=2, library_size=8, diversity=0.0, epochs=1), progress=False)
    return out


def test_export_reproduces_the_runs_inverted_prompts(pgn_run, capsys):
    assert main(["export", str(pgn_run)]) == 0
    path = pgn_run / "pixel_prompts.safetensors"
    assert str(path) in capsys.readouterr().out
    pixel, settings = load_pixel_prompts(path)
    assert settings["num_prompts"] == 2 and settings["exact"]

    cfg = tiny(pgn_run, method="pgn", num_prompts=2, library_size=8).resolved()
    model, (_, _, test_set), _ = build_run(cfg, torch.device("cpu"))
    model.load_trainable_state(checkpoint.load_tensors(pgn_run / "best"))
    model.eval()
    vit = PromptedViT(model.backbone)
    images = model.prompter(test_set.images[:8])
    with torch.no_grad():
        tokens = model.tokens(images)
        expected = paste_patches(images, invert_prompts(vit, tokens))
        got = pixel(images)
        inverted = pixel.patches(images)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got, images)  # the patches replaced image content
    assert float(inverted.residual.max()) < 1e-5  # tiny ViT: d = 64 <= 3 * 16^2, every token is reachable
    with torch.no_grad():  # re-embedded, the pasted patches are the tokens (up to float error)
        reembedded = inverted.patches.flatten(-3) @ pixel.inverse.matrix.float().t() + pixel.inverse.offset.float()
    torch.testing.assert_close(reembedded, tokens, rtol=1e-4, atol=1e-4)


def test_gap_between_latent_and_pixel_prompts_is_measured(pgn_run):
    from vpfast.export import export_pixel_prompts, pixel_prompt_gap

    export_pixel_prompts(pgn_run)
    gap = pixel_prompt_gap(pgn_run, batch_size=16)
    results = json.loads((pgn_run / "results.json").read_text())
    assert gap["latent_acc"] == results["test_acc"]  # the same model and split as training's own test
    assert 0 <= gap["pixel_acc"] <= 1 and 0 <= gap["top1_agreement"] <= 1 and gap["test_images"] == 32
    assert gap["mean_residual"] < 1e-5


def test_export_refuses_a_pixel_prompter_run(tmp_path):
    train(tiny(tmp_path, max_steps=1), progress=False)
    with pytest.raises(ValueError, match=r"turns prompt-token runs \(PGN\) into pixel prompts; .* is a run of method "
                                         r"'evp', for which export does nothing: the prompt is already pixels"):
        from vpfast.export import export_pixel_prompts

        export_pixel_prompts(tmp_path / "last")


def test_loading_a_foreign_file_says_so(tmp_path):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="is not a vpfast pixel-prompt file"):
        load_pixel_prompts(tmp_path / "other.safetensors")
