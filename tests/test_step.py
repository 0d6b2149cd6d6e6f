"""The training step: no host synchronization between log intervals, and the CUDA-graph wrapper's logic
(warm-up, one graph per input shape and learning rate, copy-in, every call a real step)."""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from vpfast.train.build import build_optimizer
from vpfast.train.config import TrainConfig
from vpfast.train.loop import base_columns, build_run
from vpfast.train.resume import restore
from vpfast.train.step import GraphedStep, TrainStep, graph_support, make_step

pytestmark = pytest.mark.cpu

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
# Each case's method and options: EVP's recipe flips every sample at random, "evp-diversity" also moves and resizes
# them, "patch" places its patch at random: all three draw random values for every step.
METHOD_OPTIONS = {"evp": dict(method="evp"), "evp-diversity": dict(method="evp", diversity=0.5),
                  "patch": dict(method="patch"), "pgn": dict(method="pgn", num_prompts=2, library_size=8),
                  "provp": dict(method="provp", num_prompts=2), "protuning": dict(method="protuning", vit_stages=2)}
RANDOM_STEPS = ("evp", "evp-diversity", "patch")


def _run_pieces(case: str, device: str = "cpu"):
    cfg = TrainConfig(model="open_clip:ViT-B-32", pretrained=None, model_cfg=TINY_CLIP, data="digits",
                      epochs=2, batch_size=8, train_limit=32, test_limit=8, device=device, out="unused",
                      **METHOD_OPTIONS[case]).resolved()
    model, (train_set, _, _), classes = build_run(cfg, torch.device(device))
    optimizer, schedule = build_optimizer(cfg, model, cfg.epochs)
    step = TrainStep(plain_loss(model, base_columns(cfg, len(classes))), optimizer, torch.device(device),
                     model.draw_step)
    return model.train(), train_set, optimizer, schedule, step


def plain_loss(model, columns: slice = slice(None)):
    """What the loop computes on one process: cross-entropy on ``columns``, plus the method's extra loss."""

    def loss(images, labels):
        value = F.cross_entropy(model(images)[:, columns], labels)
        extra = model.auxiliary_loss()
        return value if extra is None else value + extra

    return loss


# Argument checks compose runs only on host tensors (their values read on the CPU): on a GPU they are skipped, on the
# CPU their reads are no synchronization.
HOST_ONLY_CHECKS = {"channel_vector", "check_transform"}
# On the CPU Adam is not capturable (count_steps_on_device) and reads its step count on the host: no synchronization.
CPU_ONLY_READS = {"_get_value"}


class _HostSyncs(TorchDispatchMode):
    """Records every op that reads a tensor's value on the host (outside HOST_ONLY_CHECKS) or copies
    between devices, except a step's random values that ``draw_step`` copies to the device as it does the
    batch (a host-to-device copy that waits for nothing)."""

    def __init__(self, allowed: set[str] = HOST_ONLY_CHECKS) -> None:
        super().__init__()
        self.seen: list[str] = []
        self.allowed = allowed

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._local_scalar_dense.default and not self.allowed & {
                frame.name for frame in traceback.extract_stack()}:
            self.seen.append(str(func))
        devices = {a.device.type for a in args if isinstance(a, torch.Tensor)}
        if isinstance(out, torch.Tensor):
            devices.add(out.device.type)
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default) and len(devices) > 1:
            to_device = isinstance(out, torch.Tensor) and out.device.type != "cpu"
            if not (to_device and "draw_step" in {frame.name for frame in traceback.extract_stack()}):
                self.seen.append(f"{func} between {sorted(devices)}")
        return out


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", METHOD_OPTIONS)
def test_steps_make_no_host_synchronization(method, device):
    model, train_set, optimizer, _, step = _run_pieces(method, device)
    batches = [(x.to(device), y.to(device)) for x, y in
               (train_set[i * 8:(i + 1) * 8] for i in range(3))]  # the batch is moved before the trace
    step(*batches[0])  # the first step creates the optimizer state
    with _HostSyncs(HOST_ONLY_CHECKS | (CPU_ONLY_READS if device == "cpu" else set())) as trace:
        for images, labels in batches:
            step(images, labels)
    assert trace.seen == []
    assert step.loss_steps == 4 and float(step.mean_loss()) > 0 and step.loss_steps == 0


def test_the_trace_sees_a_host_read():
    model, train_set, optimizer, _, step = _run_pieces("evp")
    reading = TrainStep(lambda x, y: step.loss(x, y) * (1 + 0 * model(x).sum().item()), optimizer,
                        torch.device("cpu"))
    with _HostSyncs() as trace:
        reading(*train_set[:8])
    assert trace.seen == ["aten._local_scalar_dense.default"]


def test_mean_loss_is_the_mean_since_the_last_read():
    _, train_set, _, _, step = _run_pieces("evp")
    images, labels = train_set[:8]
    losses = []
    for _ in range(3):
        step(images, labels)
        losses.append(float(step.mean_loss()))
    for _ in range(2):
        step(images, labels)
    _, _, _, _, fresh = _run_pieces("evp")
    sum_of_three = 0.0
    for _ in range(3):
        fresh(images, labels)
        sum_of_three += float(fresh.mean_loss())
    assert sum_of_three == pytest.approx(sum(losses))


class _FakeGraph:
    """A recorded body that runs only when replayed, as a CUDA graph does. A real replay runs no Python, so a
    value drawn on the host inside the body would be frozen at its capture: a replay here fails if the body
    draws from one of ``host_generators``."""

    def __init__(self, body, host_generators=()) -> None:
        self.body, self.replays, self.host_generators = body, 0, tuple(host_generators)

    def replay(self) -> None:
        before = [generator.get_state() for generator in self.host_generators]
        self.replays += 1
        self.body()
        after = [generator.get_state() for generator in self.host_generators]
        assert all(map(torch.equal, before, after)), "the replayed step drew random values on the host"


class _FakeGraphedStep(GraphedStep):
    """GraphedStep's logic on the CPU: recording returns a fake graph, warm-up runs on the current stream."""

    def __init__(self, step, warmup: int = 3, host_generators=()) -> None:
        super().__init__(step, warmup)
        self.host_generators = host_generators

    def _record(self, body):
        return _FakeGraph(body, self.host_generators)

    def _eager(self, images, labels, *args):
        self.step(images, labels, *args)


def test_graphed_step_follows_the_eager_steps_exactly():
    """Two epochs with a partial last batch and a learning rate that changes per epoch: one capture per
    (shape, rate), the static inputs take each batch, and the prompt ends bit-identical to eager steps."""
    results = []
    for wrap in (lambda s: s, lambda s: _FakeGraphedStep(s, warmup=2)):
        model, train_set, optimizer, schedule, step = _run_pieces("evp")
        runner = wrap(step)
        for epoch in range(2):
            for index in torch.arange(29).split(8):  # 8, 8, 8, 5
                runner(*train_set[index + epoch])
            schedule.step()
        results.append((model.prompter.prompt.detach().clone(), runner, float(step.mean_loss())))
    (eager_prompt, _, eager_loss), (graphed_prompt, graphed, graphed_loss) = results
    assert torch.equal(graphed_prompt, eager_prompt) and graphed_loss == eager_loss
    assert not torch.equal(eager_prompt, torch.zeros_like(eager_prompt))
    # full batches: 2 warm-up steps in epoch 0, then a capture; a new rate in epoch 1: one more capture.
    # The 5-image batch: warm-up in both epochs (2 runs), never captured.
    assert graphed.captures == 2
    full = graphed.shapes[((8, 3, 8, 8), torch.uint8, (8,))]
    assert full.eager_runs == 2 and len(full.graphs) == 1
    (graph, static_images, _), = full.graphs.values()
    assert graph.replays == 3 and torch.equal(static_images, train_set[torch.arange(16, 24) + 1][0])


@pytest.mark.parametrize("case", RANDOM_STEPS)
def test_graphed_steps_draw_new_random_values_before_every_replay(case):
    """Flips, diversity rows and patch locations are drawn on the host before each step, never inside the
    replayed work: the graphed run follows the eager one bit for bit. One warm-up step: the full batches are
    captured in both epochs (a new learning rate), the last 5-image batch in the second."""
    results = []
    for graphed in (False, True):
        model, train_set, optimizer, schedule, step = _run_pieces(case)
        generators = [model.prompter.generator]
        runner = _FakeGraphedStep(step, warmup=1, host_generators=generators) if graphed else step
        for epoch in range(2):
            for index in torch.arange(29).split(8):
                runner(*train_set[index + epoch])
            schedule.step()
        results.append((model.prompter.prompt.detach().clone(), generators[0].get_state(), runner))
    (eager_prompt, eager_state, _), (graphed_prompt, graphed_state, runner) = results
    assert torch.equal(graphed_prompt, eager_prompt) and torch.equal(graphed_state, eager_state)
    assert runner.captures == 3
    replays = {shape[0][0]: [graph.replays for graph, _, _ in entry.graphs.values()]
               for shape, entry in runner.shapes.items()}
    assert replays == {8: [3], 5: [1]}


def test_graph_support_and_the_cuda_graph_flag():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert graph_support(cpu, 1) == "CUDA graphs need a CUDA device, training runs on cpu"
    assert graph_support(cuda, 1) is None
    assert "DistributedDataParallel" in graph_support(cuda, 2)
    adam = torch.optim.Adam([torch.zeros(2, requires_grad=True)])
    assert "create it with capturable=True" in graph_support(cuda, 1, adam)
    assert graph_support(cuda, 1, torch.optim.Adam([torch.zeros(2, requires_grad=True)], capturable=True)) is None
    plain = TrainStep(lambda x, y: x, torch.optim.SGD([torch.zeros(1, requires_grad=True)]), cpu)
    assert make_step(plain, None, "why", cpu) == (plain, "eager")  # no CUDA: no warning either
    assert make_step(plain, False, None, cpu) == (plain, "eager")
    with pytest.warns(RuntimeWarning, match="the training step runs eagerly, not in a CUDA graph: why"):
        assert make_step(plain, None, "why", cuda) == (plain, "eager")
    with pytest.raises(ValueError, match="--cuda-graph is not available here: why"):
        make_step(plain, True, "why", cpu)
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        GraphedStep(plain, warmup=0)


def test_adam_counts_its_steps_where_its_parameters_are():
    """Pro-tuning's Adam is capturable on CUDA only (its update then reads no host value); a checkpoint of a CUDA run,
    capturable, resumes on the CPU with the option off."""
    model, train_set, optimizer, schedule, step = _run_pieces("protuning")
    assert [group["capturable"] for group in optimizer.param_groups] == [False] * len(optimizer.param_groups)
    step(*train_set[0:8])
    saved_optimizer = optimizer.state_dict()
    for group in saved_optimizer["param_groups"]:
        group["capturable"] = True
    saved = {"tensors": model.trainable_state(), "state": {"epoch": 0}, "optimizer": saved_optimizer,
             "rng": torch.get_rng_state(), "schedule": schedule.state_dict()}
    restore(saved, 2, 2, model, optimizer, schedule)
    assert [group["capturable"] for group in optimizer.param_groups] == [False] * len(optimizer.param_groups)
    steps = [state["step"] for state in optimizer.state.values()]
    assert steps and all(s.device.type == "cpu" and s.dtype == torch.float32 and float(s) == 1 for s in steps)
    step(*train_set[8:16])
    assert all(float(state["step"]) == 2 for state in optimizer.state.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_adam_is_capturable_on_the_gpu():
    _, _, optimizer, _, _ = _run_pieces("protuning", "cuda")
    assert all(group["capturable"] for group in optimizer.param_groups)
    assert graph_support(torch.device("cuda"), 1, optimizer) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", METHOD_OPTIONS)
def test_cuda_graph_step_matches_eager_on_the_gpu(method):
    prompts = []
    for graphed in (False, True):
        model, train_set, optimizer, schedule, step = _run_pieces(method, "cuda")
        runner, path = make_step(step, graphed, graph_support(torch.device("cuda"), 1, optimizer),
                                 torch.device("cuda"))
        assert path == ("cuda-graph" if graphed else "eager")
        for epoch in range(2):
            for index in torch.arange(29).split(8):
                runner(*(t.cuda() for t in train_set[index + epoch]))
            schedule.step()
        prompts.append([p.detach().clone() for p in model.trained.parameters()])
        if graphed:
            assert runner.captures == 2
    for eager, graphed in zip(*prompts, strict=True):
        torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-6)


def test_host_arguments_of_the_loss_key_the_graphs():
    """A host value the loss reads (the DDP global batch size) is baked into a capture: a new value, a new graph."""
    results = []
    for wrap in (lambda s: s, lambda s: _FakeGraphedStep(s, warmup=1)):
        weight = torch.ones(3, requires_grad=True)
        step = TrainStep(lambda x, y, scale, weight=weight: (weight * x).sum() * scale,
                         torch.optim.SGD([weight], lr=0.1), torch.device("cpu"))
        runner = wrap(step)
        for scale in (1.0, 1.0, 1.0, 2.0, 2.0, 1.0):
            runner(torch.arange(3.0), torch.zeros(1), scale)
        results.append((weight.detach().clone(), runner))
    (eager, _), (graphed, runner) = results
    assert torch.equal(graphed, eager) and runner.captures == 3  # 1.0, then 2.0, then 1.0 again
