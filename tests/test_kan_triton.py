"""The fused Triton kernels of grouped B-spline layers against the PyTorch path.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``, set
by ``conftest.py`` before Triton is imported); ``eval/gpu_check.sh`` runs this file on CUDA for
real. Shapes are small and deliberately ragged: token counts, widths and group sizes that are no
multiple of the kernels' 32-wide tiles.
"""

import logging

import pytest
import torch

CUDA = torch.cuda.is_available()
pytest.importorskip("triton", reason="triton is not installed (the dev extra installs it where it can)")

from kangpt import kan_fast, kan_triton  # noqa: E402
from kangpt.kan import KANLinear, KANSpec  # noqa: E402
from kangpt.kan_triton import grouped_linear  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
# (tokens, in, out, groups): group sizes 3, 12, 32 and 40; nothing a multiple of 32 but one width.
SHAPES = [(5, 12, 7, 4), (70, 96, 40, 8), (33, 64, 45, 2), (40, 80, 64, 2)]


def layers(n_in, n_out, groups, seed=0):
    """A grouped B-spline layer with functions far from their start, and its twin on the kernels."""
    torch.manual_seed(seed)
    spec = KANSpec(sharing="group", groups=groups, kernel="torch")
    torch_layer = KANLinear(n_in, n_out, spec).to(DEVICE)
    with torch.no_grad():
        torch_layer.basis.coefficients.normal_()
        torch_layer.bias.normal_()
    fused = KANLinear(n_in, n_out, spec.replace(kernel="triton")).to(DEVICE)
    fused.load_state_dict(torch_layer.state_dict())
    return torch_layer, fused


def outputs_and_grads(layer, x, dtype=torch.float32):
    x = x.detach().clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        y = layer(x)
    weights = torch.linspace(-1, 1, y.shape[-1], device=y.device)
    (y.float() * weights).square().sum().backward()
    grads = [x.grad, *(p.grad for p in layer.parameters())]
    return y.float(), grads


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_values_and_gradients_match_the_torch_path(shape):
    n, n_in, n_out, groups = shape
    reference, fused = layers(n_in, n_out, groups)
    x = 2 * torch.randn(n, n_in, device=DEVICE)  # inputs on and beyond the grid's ends
    y_ref, grads_ref = outputs_and_grads(reference, x)
    y, grads = outputs_and_grads(fused, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    names = ["input", "weight", "bias", "coefficients"]
    for name, got, want in zip(names, grads, grads_ref, strict=True):
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * scale, msg=name)


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_bf16_matches_the_torch_path_within_bf16_rounding(shape):
    """bf16 matmuls (fp32 accumulation, the functions in fp32): within 2% of the largest value."""
    n, n_in, n_out, groups = shape
    reference, fused = layers(n_in, n_out, groups, seed=1)
    x = torch.randn(n, n_in, device=DEVICE)
    y_ref, grads_ref = outputs_and_grads(reference, x)  # fp32 reference
    y, grads = outputs_and_grads(fused, x, torch.bfloat16)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0.02 * y_ref.abs().max().item())
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got.float(), want, rtol=0, atol=0.02 * want.abs().max().item())


def test_the_layer_saves_only_its_input_and_compiles_around_the_op():
    reference, fused = layers(24, 16, 4, seed=2)
    x = torch.randn(70, 24, device=DEVICE, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in fused.parameters()}
    saved = []

    def pack(t):  # the basis's constant tables (a few hundred numbers) aside
        if t.untyped_storage().data_ptr() not in params and t.numel() > 1000:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fused(x).sum()
    assert [t.data_ptr() for t in saved] == [x.data_ptr()]
    compiled = torch.compile(fused, backend="aot_eager" if not CUDA else "inductor", fullgraph=True)
    torch.testing.assert_close(compiled(x), reference(x), rtol=1e-4, atol=1e-4)


def test_direct_call_matches_the_layer():
    reference, fused = layers(12, 5, 4, seed=3)
    x = torch.randn(6, 12, device=DEVICE)
    torch.testing.assert_close(
        grouped_linear(x, fused.weight, fused.bias, fused.basis), reference(x), rtol=1e-4, atol=1e-4
    )


@pytest.fixture
def auto_here(monkeypatch):
    """kernel="auto" chooses the kernels on this test's device as it does on CUDA (on CPU they run in
    Triton's interpreter), and has not tried them yet in this process."""
    monkeypatch.setattr(kan_fast, "AUTO_KERNEL_DEVICES", (DEVICE,))
    monkeypatch.setattr(kan_fast, "_kernels_ran", {})


class FailingKernel:
    """A Triton kernel whose launch fails, as one that does not compile for the GPU at hand."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise RuntimeError("forced launch failure")

        return launch


def auto_twin(reference: KANLinear) -> KANLinear:
    spec = reference.spec.replace(kernel="auto")
    auto = KANLinear(reference.in_features, reference.out_features, spec).to(DEVICE)
    auto.load_state_dict(reference.state_dict())
    return auto


@pytest.mark.parametrize("kernel", ["_forward_kernel", "_grad_weight_kernel"])
def test_auto_warns_once_and_runs_the_torch_path_where_the_kernels_fail(
    kernel, auto_here, monkeypatch, caplog
):
    monkeypatch.setattr(kan_triton, kernel, FailingKernel())
    reference, fused = layers(64, 40, 8, seed=4)
    auto = auto_twin(reference)
    x = torch.randn(33, 64, device=DEVICE)
    with caplog.at_level(logging.WARNING, logger="kangpt.kan_fast"):
        y, grads = outputs_and_grads(auto, x)
        grads = [g.clone() for g in grads]  # the call below adds to them
        auto(x).sum().backward()  # tried once per process, device and dtype: no second warning
    y_ref, grads_ref = outputs_and_grads(reference, x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)  # the PyTorch path itself
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert [record.getMessage() for record in caplog.records if record.name == "kangpt.kan_fast"] == [
        f"the fused Triton KAN kernels failed on {DEVICE} (torch.float32 inputs, torch.float32 matmuls): "
        "RuntimeError: forced launch failure; kan_kernel 'auto' runs the PyTorch path in this process "
        "('triton' raises the error)"
    ]
    with pytest.raises(RuntimeError, match="forced launch failure"):  # asked for by name, they still raise
        outputs_and_grads(fused, x)


def test_auto_runs_the_kernels_where_they_work(auto_here, monkeypatch, caplog):
    calls = []

    def counted(*args):
        calls.append(args[0].shape)
        return grouped_linear(*args)

    monkeypatch.setattr(kan_triton, "grouped_linear", counted)
    reference, fused = layers(64, 40, 8, seed=5)
    auto = auto_twin(reference)
    x = torch.randn(33, 64, device=DEVICE)
    with caplog.at_level(logging.WARNING, logger="kangpt.kan_fast"):
        y, grads = outputs_and_grads(auto, x)
    y_fused, grads_fused = outputs_and_grads(fused, x)
    assert calls[-2:] == [(33, 64), (33, 64)]  # the try (a few tokens) came first; then every call
    assert len(calls) == 3 and not [record for record in caplog.records if record.name == "kangpt.kan_fast"]
    torch.testing.assert_close(y, y_fused, rtol=0, atol=0)
    for got, want in zip(grads, grads_fused, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_auto_under_torch_compile_tries_the_kernels_once_and_falls_back(auto_here, monkeypatch, caplog):
    monkeypatch.setattr(kan_triton, "_forward_kernel", FailingKernel())
    reference, _ = layers(24, 16, 4, seed=6)
    compiled = torch.compile(auto_twin(reference), backend="aot_eager", fullgraph=True)  # no graph break
    x = torch.randn(70, 24, device=DEVICE)
    with caplog.at_level(logging.WARNING, logger="kangpt.kan_fast"):
        y = compiled(x)
        compiled(x)
    torch.testing.assert_close(y, reference(x), rtol=1e-5, atol=1e-5)
    warned = [record.getMessage() for record in caplog.records if record.name == "kangpt.kan_fast"]
    assert len(warned) == 1 and "RuntimeError: forced launch failure" in warned[0]
