"""vpfast train's speed settings: the path taken is reported, the loader and in-memory paths train the same
prompt, bad values are clear errors, and on a GPU the resident and captured paths resume exactly."""

from __future__ import annotations

import json
import re

import pytest
import torch

import test_train
from vpfast.train import checkpoint, data
from vpfast.train.config import TrainConfig
from vpfast.train.loop import train

pytestmark = pytest.mark.cpu


def tiny(out, **changes) -> TrainConfig:
    """test_train's tiny EVP run with 60 training images (a partial last batch), logged every 2 steps."""
    return test_train.tiny(out, **{"train_limit": 60, "log_every": 2, **changes})


class _Streamed(torch.utils.data.Dataset):
    """In-memory images behind the generic Dataset interface, so batches go through the persistent loader."""

    def __init__(self, images: data.TensorImages) -> None:
        self.images, self.classes = images, images.classes
        self.targets = images.labels.tolist()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        return self.images.images[index], int(self.images.labels[index])


def test_loader_and_in_memory_paths_train_the_same_prompt(tmp_path, monkeypatch):
    """60 images in batches of 16: a partial last batch every epoch; diversity on, so the order matters."""
    in_memory = train(tiny(tmp_path / "memory"), progress=False)
    store = data.store
    monkeypatch.setattr(data, "store", lambda datasets, setting, device: store(
        [_Streamed(d) for d in datasets], setting, device))
    streamed = train(tiny(tmp_path / "loader", num_workers=1), progress=False)
    a, b = (checkpoint.load_tensors(tmp_path / run / "last")["prompter.prompt"] for run in ("memory", "loader"))
    assert torch.equal(a, b) and a.abs().max() > 0
    assert (in_memory["data_device"], streamed["data_device"]) == ("cpu", "loader")
    assert in_memory["test_acc"] == streamed["test_acc"]


def test_the_path_taken_is_logged_and_in_the_results(tmp_path):
    results = train(tiny(tmp_path, epochs=1), progress=False)
    expected = {"precision": "fp32", "compile": "off", "train_step": "eager", "data_device": "cpu",
                "train_step_not_graphed": "CUDA graphs need a CUDA device, training runs on cpu"}
    assert {k: results[k] for k in expected} == expected
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {k: records[0][k] for k in expected} == expected and records[0]["step"] == 0
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)  # 4 steps, logged every 2: means of 2


def test_bf16_precision_trains_on_the_cpu_with_a_bf16_canvas(tmp_path):
    results = train(tiny(tmp_path, epochs=1, precision="bf16", diversity=0.0), progress=False)
    assert results["precision"] == "bf16" and 0 <= results["test_acc"] <= 1
    prompt = checkpoint.load_tensors(tmp_path / "last")["prompter.prompt"]
    assert prompt.dtype == torch.float32 and prompt.abs().max() > 0


@pytest.mark.parametrize("args,message", [
    (["--precision", "fp16"], r"--precision must be one of \('auto', 'fp32', 'bf16'\), got 'fp16'"),
    (["--compile", "yes"], r"--compile must be one of \('auto', 'on', 'off'\), got 'yes'"),
    (["--cuda-graph", "always"], r"--cuda-graph must be one of \('auto', 'on', 'off'\), got 'always'"),
    (["--data-device", "gpu"], r"--data-device must be one of \('auto', 'cpu', 'cuda'\), got 'gpu'"),
    (["--device", "cpu", "--data-device", "cuda"],
     r"data_device 'cuda' stores the data on the training GPU, but training runs on cpu"),
    (["--device", "cpu", "--cuda-graph", "on", "--data-device", "cpu"],
     r"--cuda-graph is not available here: CUDA graphs need a CUDA device, training runs on cpu"),
])
def test_bad_speed_flags_are_clear_errors(args, message, capsys, tmp_path):
    from vpfast.cli import main

    common = ["--model", "open_clip:ViT-B-32", "--pretrained", "none", "--model-cfg", json.dumps(test_train.TINY_CLIP),
              "--data", "digits", "--epochs", "1", "--batch-size", "16", "--train-limit", "16", "--test-limit",
              "16", "--num-workers", "0", "--out", str(tmp_path)]
    assert main(["train", *common, *args]) == 2
    assert re.search("vpfast: error: " + message, capsys.readouterr().err)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resident_captured_run_resumes_exactly_on_the_gpu(tmp_path):
    gpu = dict(device="cuda", diversity=0.0, data_device="cuda", compile="off")
    straight = train(tiny(tmp_path / "a", **gpu), progress=False)
    assert (straight["train_step"], straight["data_device"], straight["precision"]) == ("cuda-graph", "cuda:0", "bf16")
    train(tiny(tmp_path / "b", max_steps=3, **gpu), progress=False)
    resumed = train(tiny(tmp_path / "b", **gpu), resume=True, progress=False)
    a, b = (checkpoint.load_tensors(tmp_path / run / "last")["prompter.prompt"] for run in ("a", "b"))
    assert torch.equal(a, b) and straight["test_acc"] == resumed["test_acc"]


# method -> TrainConfig changes for a tiny run of it (on test_train's tiny open_clip ViT unless a model is named)
COMPILED_METHODS = {
    "pgn": dict(method="pgn", num_prompts=2, library_size=8),
    "provp": dict(method="provp", num_prompts=2),
    "protuning": dict(method="protuning", vit_stages=2),
    "vpt": dict(method="vpt", num_prompts=2),
    "protuning-efficientnet": dict(method="protuning", model="timm:tf_efficientnet_lite0", pretrained=None,
                                   image_size=32, label_mapping="first-k"),
    "protuning-resnet": dict(method="protuning", model="torchvision:resnet18", pretrained=None, image_size=32,
                             label_mapping="first-k"),
}


@pytest.mark.parametrize("method", COMPILED_METHODS)
def test_token_and_adapter_methods_compile_the_prompted_forward_without_graph_breaks(method):
    """The model vpfast train builds, traced by dynamo: normalization (compose), PGN's generator and token_mix,
    the ViT or CNN with its prompt hooks, ProVP's frozen pass and re-formation loss, in one graph."""
    from vpfast.train.loop import build_run

    cfg = tiny("unused", diversity=0.0, **COMPILED_METHODS[method]).resolved()
    model, (train_set, _, _), _ = build_run(cfg, torch.device("cpu"))
    model.train()
    explained = torch._dynamo.explain(model._source_logits)(train_set.images[:4])
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_a_compiled_prompted_forward_needs_an_uncompiled_backbone():
    from vpfast.backbones import FrozenClassifier
    from vpfast.train.build import Normalizer, PromptedClassifier

    backbone = FrozenClassifier(torch.nn.Flatten(), input_size=(2, 2), mean=(0.5,) * 3, std=(0.5,) * 3,
                                num_classes=12, compile="aot_eager")
    with pytest.raises(ValueError, match=r"compile=True compiles the whole prompted forward, but the backbone is "
                                         r"already compiled \(compile='aot_eager'\): compile one of them"):
        PromptedClassifier(Normalizer(2, backbone.mean, backbone.std), backbone, None, compile=True)
    assert PromptedClassifier(Normalizer(2, backbone.mean, backbone.std), backbone, None).compiled == "backbone"


@pytest.mark.parametrize("method", ["pgn", "provp"])
def test_compiled_token_and_adapter_runs_train_what_eager_trains(method, tmp_path, monkeypatch):
    """--compile on (backend aot_eager: the traced graphs, run without code generation) against --compile off:
    the path is reported, and the trained tensors agree to float32 rounding (1e-4 relative after 4 steps of
    SGD at the recipes' learning rates)."""
    from vpfast.train import fast

    monkeypatch.setattr(fast, "COMPILE_BACKEND", "aot_eager")
    changes = dict(epochs=1, train_limit=32, test_limit=16, diversity=0.0, **COMPILED_METHODS[method])
    runs = {name: train(tiny(tmp_path / name, compile=name, **changes), progress=False) for name in ("off", "on")}
    assert (runs["off"]["compile"], runs["on"]["compile"]) == ("off", "prompted forward")
    metrics = [json.loads(line) for line in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["compile"] == "prompted forward"
    eager, compiled = (checkpoint.load_tensors(tmp_path / name / "last") for name in ("off", "on"))
    assert eager.keys() == compiled.keys()
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("changes,size", [({}, 164), ({"image_size": 112}, 82), ({"pad": 10}, 204),
                                          ({"method": "pad"}, 224), ({"method": "pgn", "image_size": 96}, 96)])
def test_image_files_are_decoded_at_the_prompters_inner_size(changes, size):
    from vpfast.train import fast

    assert fast.decode_size(TrainConfig(**changes)) == size
