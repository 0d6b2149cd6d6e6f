"""The training step as one object: forward, loss, backward and optimizer update with no host synchronization,
optionally captured in CUDA graphs.

``TrainStep`` is a plain function of (images, labels): the loss is summed on the device and read only
through ``mean_loss`` (at log intervals); a step's random values (input diversity, flips, patch
locations) are drawn on the host before its device work, into buffers the device work reads.
``GraphedStep`` wraps it: per input shape it runs ``warmup`` eager steps (they allocate optimizer state
and warm the libraries), then captures one step in a CUDA graph and replays it with each new batch
copied into the captured inputs and each step's draws made before the replay. The last partial
batch of an epoch gets its own graph, so no shape is recompiled or padded. The learning rates are part of
the key, since the optimizers read them as Python numbers: a scheduler step means one new capture per
epoch. Every call is a real training step, whatever path it takes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vpfast._warn import warn_once


class TrainStep:
    """``loss(images, labels, *args)``, backward, ``optimizer.step()``; the loss summed on the device.

    ``args`` are host values the loss reads (e.g. the global batch size under DDP); ``GraphedStep`` keys
    its graphs on them. ``draw(batch_size)``, if given, draws the step's random values on the host into
    the device buffers the loss reads (``PromptedClassifier.draw_step``), outside the device work.
    """

    def __init__(self, loss: Callable[..., torch.Tensor], optimizer: torch.optim.Optimizer,
                 device: torch.device, draw: Callable[[int], None] | None = None) -> None:
        self.loss, self.optimizer, self.draw = loss, optimizer, draw
        self.loss_sum = torch.zeros((), device=device)
        self.loss_steps = 0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, *args) -> None:
        """One step; the loss stays on the device."""
        self.draw_step(images)
        self.compute(images, labels, *args)
        self.loss_steps += 1

    def draw_step(self, images: torch.Tensor) -> None:
        """The host part of a step: draw its random values (nothing without ``draw``)."""
        if self.draw is not None:
            self.draw(images.shape[0])

    def compute(self, images: torch.Tensor, labels: torch.Tensor, *args) -> None:
        """The device work of one step (what a CUDA graph captures): no host value is read or written."""
        loss = self.loss(images, labels, *args)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.loss_sum += loss.detach()

    def mean_loss(self) -> torch.Tensor:
        """The mean loss since the last call, on the device (reading it is a host synchronization: do it at log
        intervals only)."""
        mean = self.loss_sum / max(self.loss_steps, 1)
        self.loss_sum.zero_()
        self.loss_steps = 0
        return mean


@dataclass
class _Shape:
    eager_runs: int = 0
    graphs: dict = field(default_factory=dict)  # (learning rates, host args) -> (graph, static images, labels)


class GraphedStep:
    """``step`` replayed from CUDA graphs, one per (input shape, learning rates, host args), after ``warmup``
    eager runs."""

    def __init__(self, step: TrainStep, warmup: int = 3) -> None:
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 eager step before a capture, got {warmup}")
        self.step, self.warmup = step, warmup
        self.shapes: dict[tuple, _Shape] = {}
        self.captures = 0
        self._pool = None

    def _learning_rates(self) -> tuple:
        return tuple(float(group["lr"]) for group in self.step.optimizer.param_groups)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, *args) -> None:
        shape = self.shapes.setdefault((tuple(images.shape), images.dtype, tuple(labels.shape)), _Shape())
        if shape.eager_runs < self.warmup:
            self._eager(images, labels, *args)
            shape.eager_runs += 1
            return
        self.step.draw_step(images)
        key = (self._learning_rates(), args)
        if key not in shape.graphs:
            shape.graphs = {key: self._capture(images, labels, *args)}  # older rates never come back: free them
        graph, static_images, static_labels = shape.graphs[key]
        static_images.copy_(images, non_blocking=True)
        static_labels.copy_(labels, non_blocking=True)
        graph.replay()
        self.step.loss_steps += 1

    def _eager(self, images: torch.Tensor, labels: torch.Tensor, *args) -> None:
        """A warm-up step on a side stream, as capture requires."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.step(images, labels, *args)
        torch.cuda.current_stream().wait_stream(side)

    def _record(self, body: Callable[[], None]):
        """A CUDA graph of ``body``, recorded (not run); every graph shares one memory pool."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            body()
        return graph

    def _capture(self, images: torch.Tensor, labels: torch.Tensor, *args) -> tuple:
        static_images, static_labels = images.clone(), labels.clone()
        self.step.optimizer.zero_grad(set_to_none=True)
        graph = self._record(lambda: self.step.compute(static_images, static_labels, *args))
        self.captures += 1
        return graph, static_images, static_labels


def count_steps_on_device(optimizer: torch.optim.Optimizer) -> None:
    """Set the ``capturable`` option (Adam's, and the other optimizers that have one) of each parameter group to
    whether its parameters are on CUDA, with its step counts moved there: then the update reads no host value and
    can be replayed from a CUDA graph. A loaded state_dict brings back the option of the run that saved it, so
    call this after loading too."""
    for group in optimizer.param_groups:
        if "capturable" not in group:
            continue
        on_cuda = all(p.is_cuda for p in group["params"])
        group["capturable"] = on_cuda
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "step" in state:
                state["step"] = state["step"].to(device=p.device if on_cuda else "cpu", dtype=torch.float32)


def graph_support(device: torch.device, world_size: int,
                  optimizer: torch.optim.Optimizer | None = None) -> str | None:
    """Why the step cannot be captured in a CUDA graph (None: it can).

    An optimizer with a ``capturable`` option (Adam) must have it on: otherwise it counts steps on the
    host. A step's random values are no obstacle: ``TrainStep.draw`` makes them before each replay.
    """
    if optimizer is not None and any(group.get("capturable") is False for group in optimizer.param_groups):
        return f"{type(optimizer).__name__} counts its steps on the host (create it with capturable=True)"
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, training runs on {device}"
    if world_size > 1:
        return "not under DistributedDataParallel (its gradient all-reduce is not captured here)"
    return None


def make_step(step: TrainStep, cuda_graph: bool | None, why_not: str | None,
              device: torch.device) -> tuple[Callable, str]:
    """(the callable step, the path taken: "eager" or "cuda-graph") for ``--cuda-graph`` on/off/default.

    ``cuda_graph`` None: captured where supported, with a warning (once per reason) naming why not when
    training on CUDA.
    True where unsupported: an error naming why.
    """
    if cuda_graph is True and why_not is not None:
        raise ValueError(f"--cuda-graph is not available here: {why_not}")
    if cuda_graph is None and why_not is not None and device.type == "cuda":
        warn_once(f"cuda-graph: {why_not}", f"the training step runs eagerly, not in a CUDA graph: {why_not}")
    if cuda_graph is False or why_not is not None:
        return step, "eager"
    return GraphedStep(step), "cuda-graph"
