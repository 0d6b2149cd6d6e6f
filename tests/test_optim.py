"""NormalizedSGD and cosine_per_epoch: the formula, the released EVP training step, and DDP equivalence."""

from __future__ import annotations

import math
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from compose_cases import rel_err
from vpfast.optim import NormalizedSGD, cosine_per_epoch
from vpfast.prompters import CLIP_MEAN, CLIP_STD, EVPrompter, PatchPrompter

pytestmark = pytest.mark.cpu

S, PAD, CLASSES = 32, 4, 5


def _frozen_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    """A tiny random conv net (smooth, so float32 and float64 runs stay close), frozen."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 6, 5, stride=3), nn.Tanh(), nn.Conv2d(6, 8, 3, stride=2), nn.Tanh(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, CLASSES))
    return model.to(dtype).requires_grad_(False)


def _batches(steps: int, batch: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """uint8 images already at EVP's inner size (its loader shrinks them) and labels."""
    g = torch.Generator().manual_seed(seed)
    s = S - 2 * PAD
    return [(torch.randint(0, 256, (batch, 3, s, s), generator=g, dtype=torch.uint8),
             torch.randint(0, CLASSES, (batch,), generator=g)) for _ in range(steps)]


def _train_vpfast(batches, epochs: int, lr: float) -> torch.Tensor:
    model = _frozen_model()
    prompter = EVPrompter(image_size=S, pad=PAD, diversity=None)
    opt = NormalizedSGD.for_prompter(prompter, lr=lr)
    schedule = cosine_per_epoch(opt, epochs)
    for _ in range(epochs):
        for images, labels in batches:
            opt.zero_grad()
            F.cross_entropy(model(prompter(images)), labels).backward()
            opt.step()
        schedule.step()
    return prompter.prompt.detach()


def _train_released_evp(batches, epochs: int, lr: float) -> torch.Tensor:
    """UCSC-VLAA/EVP main.py's train_with_prompt, in float64: B prompt copies, mean grad, global norm, mask."""
    model = _frozen_model(torch.float64)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float64).view(3, 1, 1)
    mask = torch.ones(3, S, S, dtype=torch.float64)
    mask[:, PAD:S - PAD, PAD:S - PAD] = 0
    perturbation = nn.Parameter(torch.zeros(3, S, S, dtype=torch.float64))
    for e in range(epochs):
        lr_e = lr / 2 * (1 + math.cos(math.pi * e / epochs))
        for images, labels in batches:
            images = F.pad(images.double() / 255, (PAD,) * 4, value=0.0)
            noise = perturbation.repeat(images.shape[0], 1, 1, 1)
            noise.retain_grad()
            F.cross_entropy(model((images + noise - mean) / std), labels).backward()
            grad = noise.grad.mean(0)
            scaled = grad / (torch.norm(grad.view(-1), dim=0) + 1e-10)
            perturbation.data = perturbation.data - scaled * mask * lr_e
            perturbation.grad = None
    return perturbation.detach()


def test_evp_update_matches_released_code():
    # vpfast's prompt gradient is the sum over samples, B times EVP's mean of copies: the step is scale-free up to eps.
    batches, epochs, lr = _batches(steps=2, batch=4), 3, 70.0
    got = _train_vpfast(batches, epochs, lr)
    expected = _train_released_evp(batches, epochs, lr)
    assert got.dtype == torch.float32
    assert got.abs().max() > 1.0  # the prompt moved
    assert rel_err(got, expected) < 1e-5
    assert (got[:, PAD:S - PAD, PAD:S - PAD] == 0).all()  # the masked step never touches the centre


def test_normalized_step_formula():
    g = torch.Generator().manual_seed(0)
    p, q, r = (nn.Parameter(torch.randn(3, 4, 4, generator=g)) for _ in range(3))
    mask = (torch.rand(4, 4, generator=g) > 0.5).float()
    opt = NormalizedSGD([{"params": [p], "mask": mask}, {"params": [q, r]}], lr=0.3, eps=1e-3)
    grads = [torch.randn(3, 4, 4, generator=g) for _ in range(2)]
    p.grad, q.grad = grads  # r has no gradient: skipped
    before = [t.detach().clone() for t in (p, q, r)]
    assert opt.step(lambda: torch.tensor(7.0)) == 7.0
    torch.testing.assert_close(p.detach(), before[0] - 0.3 * mask * grads[0] / (grads[0].norm() + 1e-3))
    torch.testing.assert_close(q.detach(), before[1] - 0.3 * grads[1] / (grads[1].norm() + 1e-3))
    assert torch.equal(r.detach(), before[2])


def test_for_prompter_uses_the_update_mask():
    evp = EVPrompter(image_size=S, pad=PAD)
    group = NormalizedSGD.for_prompter(evp, lr=1.0).param_groups[0]
    assert group["params"] == [evp.prompt] and group["mask"] is evp.mask
    assert NormalizedSGD.for_prompter(PatchPrompter(image_size=S, patch=5), lr=1.0).param_groups[0]["mask"] is None


def test_cosine_per_epoch():
    p = nn.Parameter(torch.zeros(1))
    opt = NormalizedSGD([p], lr=70.0)
    schedule = cosine_per_epoch(opt, 4)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()  # an epoch (no gradient: a no-op)
        schedule.step()
    assert lrs == pytest.approx([35 * (1 + math.cos(math.pi * e / 4)) for e in range(5)], abs=1e-9)


@pytest.mark.parametrize("call, message", [
    (lambda p: NormalizedSGD([p], lr=-1.0), r"lr must be >= 0, got -1.0"),
    (lambda p: NormalizedSGD([p], lr=1.0, eps=-1e-3), r"eps must be >= 0, got -0.001"),
    (lambda p: NormalizedSGD([{"params": [p], "mask": torch.ones(5, 5)}], lr=1.0),
     r"mask must be a tensor broadcastable to the parameter's shape \(3, 4, 4\), got \(5, 5\)"),
    (lambda p: cosine_per_epoch(NormalizedSGD([p], lr=1.0), 0), r"epochs must be an integer >= 1, got 0"),
])
def test_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call(nn.Parameter(torch.zeros(3, 4, 4)))


def test_rejected_group_is_not_kept():
    opt = NormalizedSGD([nn.Parameter(torch.zeros(3, 4, 4))], lr=1.0)
    with pytest.raises(ValueError, match=r"mask must be a tensor broadcastable .*got str"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3, 4, 4))], "mask": "frame"})
    assert len(opt.param_groups) == 1


# --------------------------------------------------------------------------- DDP (gloo, 2 CPU processes)

DDP_STEPS, DDP_BATCH, DDP_LR = 3, 6, 70.0


def _ddp_step(forward: nn.Module, opt, model, images, labels) -> None:
    opt.zero_grad()
    F.cross_entropy(model(forward(images)), labels).backward()
    opt.step()


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)  # as in DataLoader workers: a forked child never uses the parent's OpenMP pool
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, prompter = _frozen_model(), EVPrompter(image_size=S, pad=PAD, diversity=None)
        ddp = DistributedDataParallel(prompter)
        opt = NormalizedSGD.for_prompter(prompter, lr=DDP_LR)
        share = DDP_BATCH // world
        for images, labels in _batches(DDP_STEPS, DDP_BATCH):
            part = slice(rank * share, (rank + 1) * share)
            _ddp_step(ddp, opt, model, images[part], labels[part])
        if rank == 0:
            torch.save(prompter.prompt.detach(), out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_matches_single_process(tmp_path):
    model, prompter = _frozen_model(), EVPrompter(image_size=S, pad=PAD, diversity=None)
    opt = NormalizedSGD.for_prompter(prompter, lr=DDP_LR)
    for images, labels in _batches(DDP_STEPS, DDP_BATCH):
        _ddp_step(prompter, opt, model, images, labels)
    # fork on Linux: the workers reuse the parent's imports, torch._dynamo included (the first compose call
    # above loads it); spawn re-imports everything, 13-26 s on two busy cores. With CUDA, autograd runs
    # device threads, which fork cannot carry over.
    out = str(tmp_path / "prompt.pt")
    start_method = "fork" if sys.platform.startswith("linux") and not torch.cuda.is_available() else "spawn"
    mp.start_processes(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True, start_method=start_method)
    assert prompter.prompt.abs().max() > 1.0 and rel_err(torch.load(out), prompter.prompt) < 1e-5
    # The check can tell: normalizing each rank's gradient before averaging gives another step.
    images, labels = _batches(1, DDP_BATCH)[0]
    fresh = EVPrompter(image_size=S, pad=PAD, diversity=None)
    halves = []
    for part in (slice(0, DDP_BATCH // 2), slice(DDP_BATCH // 2, DDP_BATCH)):
        (grad,) = torch.autograd.grad(F.cross_entropy(model(fresh(images[part])), labels[part]), fresh.prompt)
        halves.append(grad)
    per_rank = sum(g / g.norm() for g in halves) / 2
    global_ = sum(halves) / sum(halves).norm()
    assert rel_err(per_rank, global_) > 1e-3
