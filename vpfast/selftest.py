"""``vpfast selftest``: a quick check that an installed vpfast works here (what every built wheel runs).

Each op of ``vpfast.ops.OPS`` runs on small random CPU inputs, forward and backward, through the
backend selection picks (the C++ kernels of ``vpfast._C`` for token_mix when the extension is loaded),
against its plain-PyTorch reference in float64 (``check_<op>``; an op without one fails); then, for an
extension built with CUDA kernels, that the CUDA kernels are registered for every extension op (they
need no GPU to be registered).
"""

from __future__ import annotations

import torch


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def _grads(fn, *inputs, grad):
    leaves = [x.detach().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    return (out, *torch.autograd.grad(out, leaves, grad))


def check_compose(generator: torch.Generator) -> float:
    from vpfast.ops.compose import Layout, compose, compose_reference

    images = torch.randint(0, 256, (3, 3, 13, 11), generator=generator, dtype=torch.uint8)
    prompt = torch.randn(3, 16, 16, generator=generator)
    mask = (torch.rand(16, 16, generator=generator) > 0.3).float()
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    grad = torch.randn(3, 3, 16, 16, generator=generator)
    got = _grads(lambda p: compose(images, p, inner_size=10, mask=mask, mean=mean, std=std), prompt, grad=grad)
    layout = Layout(16, 10, 3, 3)
    expected = _grads(lambda p: compose_reference(images, p, mask.double(), mean.double(), std.double(), None, layout),
                      prompt.double(), grad=grad.double())
    return max(_rel_err(g, e) for g, e in zip(got, expected, strict=True))


def check_token_mix(generator: torch.Generator) -> float:
    from vpfast.ops.token_mix import token_mix, token_mix_reference

    logits = torch.randn(2, 3, 17, generator=generator)
    library = torch.randn(17, 8, generator=generator)
    grad = torch.randn(2, 3, 8, generator=generator)
    options = dict(tau=0.7, gumbel=True, seed=3, topk=5)
    got = _grads(lambda z, t: token_mix(z, t, **options), logits, library, grad=grad)
    expected = _grads(lambda z, t: token_mix_reference(z, t, **options), logits.double(), library.double(),
                      grad=grad.double())
    return max(_rel_err(g, e) for g, e in zip(got, expected, strict=True))


def run(tolerance: float = 1e-5) -> list[tuple[str, bool, str]]:
    """(check, passed, detail) for every check; raises nothing."""
    from vpfast import _extension
    from vpfast.ops import OPS, _dispatch, _library, _torch_shim

    generator = torch.Generator().manual_seed(0)
    results = []
    for name in OPS:
        check = globals().get(f"check_{name}")  # looked up per run, so a test can replace one
        if check is None:
            results.append((f"{name} on CPU", False, f"no self-test for this op (vpfast/selftest.py check_{name})"))
            continue
        backend = _dispatch.choose(name, torch.device("cpu"))
        try:
            error = check(generator)
            results.append((f"{name} on CPU ({backend}) vs float64 reference", error < tolerance,
                            f"max relative error {error:.1e}"))
        except Exception as exc:  # noqa: BLE001 - a self-test reports every failure
            results.append((f"{name} on CPU ({backend})", False, f"{type(exc).__name__}: {exc}"))
    status = _extension.status()
    pure = status.build_info.get("extension") is False  # built with VPFAST_SKIP_EXT=1: no extension expected
    results.append(("extension vpfast._C", status.loaded or pure,
                    "loaded" if status.loaded else ("not built (pure-Python build)" if pure else status.reason)))
    if status.build_info.get("cuda_kernels"):
        for op in _library.EXTENSION_OPS:
            registered = _torch_shim.has_kernel(op, "CUDA")
            results.append((f"{op} has CUDA kernels registered", registered, "yes" if registered else "missing"))
    return results


def main() -> int:
    results = run()
    for name, passed, detail in results:
        print(f"{'ok  ' if passed else 'FAIL'} {name}: {detail}")
    return 0 if all(passed for _, passed, _ in results) else 1
