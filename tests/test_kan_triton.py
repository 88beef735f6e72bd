"""The fused Triton kernels of grouped B-spline layers against the PyTorch path.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``, set
by ``conftest.py`` before Triton is imported); ``eval/gpu_check.sh`` runs this file on CUDA for
real. Shapes are small and deliberately ragged: token counts, widths and group sizes that are no
multiple of the kernels' 32-wide tiles.
"""

import pytest
import torch

CUDA = torch.cuda.is_available()
pytest.importorskip("triton", reason="triton is not installed (the dev extra installs it where it can)")

from kangpt.kan import KANLinear  # noqa: E402
from kangpt.kan_triton import grouped_linear  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
# (tokens, in, out, groups): group sizes 3, 12, 32 and 40; nothing a multiple of 32 but one width.
SHAPES = [(5, 12, 7, 4), (70, 96, 40, 8), (33, 64, 45, 2), (40, 80, 64, 2)]


def layers(n_in, n_out, groups, seed=0):
    """A grouped B-spline layer with functions far from their start, and its twin on the kernels."""
    torch.manual_seed(seed)
    torch_layer = KANLinear(n_in, n_out, sharing="group", groups=groups, kernel="torch").to(DEVICE)
    with torch.no_grad():
        torch_layer.basis.coefficients.normal_()
        torch_layer.bias.normal_()
    fused = KANLinear(n_in, n_out, sharing="group", groups=groups, kernel="triton").to(DEVICE)
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
