"""Fused transformer kernels (Triton, interpreted on the CPU) against their torch twins."""

import os

import pytest
import torch

if not torch.cuda.is_available():  # must be set before any @triton.jit is decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from ursa_engine.triton_kernels import qk_norm_rope as k_rope
from ursa_engine.triton_kernels import rmsnorm as k_norm
from ursa_engine.triton_kernels import swiglu as k_swiglu

from ursa_engine.reference import rmsnorm as ref_norm
from ursa_engine.reference import rope as ref_rope
from ursa_engine.reference import swiglu as ref_swiglu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.importorskip("numpy")


def _close(out: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor):
    """Same dtype: error against the fp32-computed value at most 2x the torch twin's own + 1 ulp
    (the ulp: the Triton interpreter rounds fp32 -> bf16 toward zero, the GPU to nearest)."""
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        return
    own = (ref.float() - exact).abs().max().item()
    ulp = torch.finfo(out.dtype).eps * exact.abs().max().item()
    err = (out.float() - exact).abs().max().item()
    assert err <= 2 * own + ulp, f"error {err} vs torch's own {own}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [64, 97])
def test_rms_norm_matches_torch_twin(dtype, n):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, n, generator=g).to(DEVICE, dtype)
    w = (1 + 0.1 * torch.randn(n, generator=g)).to(DEVICE, dtype)
    out = k_norm.rms_norm(x, w, 1e-6)
    exact = ref_norm.rms_norm(x.float(), w.float(), 1e-6)
    _close(out, ref_norm.rms_norm(x, w, 1e-6), exact)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_matches_torch_twin_noncontiguous_rows(dtype):
    g = torch.Generator().manual_seed(1)
    n = 80
    x = torch.randn(6, 2 * n, generator=g).to(DEVICE, dtype)[:, :n]  # row stride 2n
    r = torch.randn(6, n, generator=g).to(DEVICE, dtype)
    w = torch.randn(n, generator=g).to(DEVICE, dtype)
    h, y = k_norm.rms_norm(x, w, 1e-6, residual=r)
    h_ref, y_ref = ref_norm.add_rms_norm(x, r, w, 1e-6)
    _close(h, h_ref, x.float() + r.float())
    _close(y, y_ref, ref_norm.rms_norm(h_ref.float(), w.float(), 1e-6))


def test_add_rms_norm_in_place_residual():
    x, r, w = torch.randn(4, 32), torch.randn(4, 32), torch.randn(32)
    expect_h, expect_y = ref_norm.add_rms_norm(x, r, w)
    h, y = k_norm.rms_norm(x.to(DEVICE), w.to(DEVICE), residual=(rr := r.to(DEVICE)), residual_out=rr)
    assert h.data_ptr() == rr.data_ptr()
    torch.testing.assert_close(h.cpu(), expect_h)
    torch.testing.assert_close(y.cpu(), expect_y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [48, 1100])
def test_swiglu_matches_torch_twin_on_fused_gate_up_views(dtype, n):
    g = torch.Generator().manual_seed(2)
    gu = (3 * torch.randn(7, 2 * n, generator=g)).to(DEVICE, dtype)
    gate, up = gu[:, :n], gu[:, n:]
    out = k_swiglu.swiglu(gate, up)
    _close(out, ref_swiglu.swiglu(gate, up), ref_swiglu.swiglu(gate.float(), up.float()))


def _rope_inputs(dtype, B=2, L=5, Hq=4, Hkv=2, D=32, seed=3):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, L, (Hq + 2 * Hkv) * D, generator=g).to(DEVICE, dtype)
    q = qkv[..., : Hq * D].unflatten(-1, (Hq, D))  # strided views of one fused projection
    k = qkv[..., Hq * D : (Hq + Hkv) * D].unflatten(-1, (Hkv, D))
    wq = (1 + 0.2 * torch.randn(D, generator=g)).to(DEVICE, dtype)
    wk = (1 + 0.2 * torch.randn(D, generator=g)).to(DEVICE, dtype)
    pos = torch.randint(0, 400, (L, 3), generator=g).to(DEVICE)
    cos, sin = ref_rope.rope_tables(pos, D, 1e6)
    return q, k, wq, wk, cos, sin


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims", [(4, 2, 32), (3, 1, 20)])  # odd: 3 heads, half = 10
def test_qk_norm_rope_matches_torch_twin(dtype, dims):
    Hq, Hkv, D = dims
    q, k, wq, wk, cos, sin = _rope_inputs(dtype, Hq=Hq, Hkv=Hkv, D=D)
    qo, ko = k_rope.qk_norm_rope(q, k, wq, wk, cos, sin, 1e-6)
    qr, kr = ref_rope.qk_norm_rope(q, k, wq, wk, cos, sin, 1e-6)
    qe, ke = ref_rope.qk_norm_rope(q.float(), k.float(), wq.float(), wk.float(), cos, sin, 1e-6)
    _close(qo, qr, qe)
    _close(ko, kr, ke)


def test_qk_norm_rope_per_sample_tables():
    q, k, wq, wk, _, _ = _rope_inputs(torch.float32)
    pos = torch.randint(0, 50, (2, 5, 3)).to(DEVICE)
    cos, sin = ref_rope.rope_tables(pos, 32, 1e6)  # (B, L, D/2)
    qo, ko = k_rope.qk_norm_rope(q, k, wq, wk, cos, sin)
    qr, kr = ref_rope.qk_norm_rope(q, k, wq, wk, cos, sin)
    torch.testing.assert_close(qo, qr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ko, kr, rtol=1e-5, atol=1e-5)


def test_rope_axes_follow_design_layout():
    axes = ref_rope.rope_axes(128)
    assert axes.tolist()[:6] == [0, 1, 2, 0, 1, 2] and axes[47] == 2
    assert axes.tolist()[48:52] == [1, 2, 1, 2] and axes[63] == 2
    assert (axes[:48] == 0).sum() == 16  # temporal axis: 16 of the 64 pairs


def test_rope_reduces_to_1d_rope_on_text_positions():
    p = torch.arange(7)
    cos3, sin3 = ref_rope.rope_tables(p[:, None].expand(-1, 3), 16, 1e4)
    ang = p[:, None].float() * ref_rope.inv_freq(16, 1e4)
    torch.testing.assert_close(cos3, ang.cos())
    torch.testing.assert_close(sin3, ang.sin())


def test_model_forward_with_triton_ops_matches_torch_ops():
    from ursa_engine.model import ModelConfig, URSATransformer, latent_positions, sequence_ids

    cfg = ModelConfig.preset("tiny", num_hidden_layers=1)
    torch.manual_seed(0)
    model = URSATransformer(cfg, device=DEVICE)
    ids = sequence_ids(torch.randint(0, 500, (2, 4)), torch.randint(0, 64, (2, 2, 3)), cfg).to(DEVICE)
    pos = latent_positions(4, (2, 3), device=DEVICE)
    ref = model(ids, pos, ops_backend="torch", attn_backend="math")
    out = model(ids, pos, ops_backend="triton", attn_backend="math", latent_tokens=6)
    torch.testing.assert_close(out, ref[:, -7:-1], rtol=1e-4, atol=1e-5)


def test_auto_uses_the_differentiable_twin_while_autograd_records():
    from ursa_engine import model_ops

    x = torch.randn(3, 8, device=DEVICE, requires_grad=True)
    w = torch.ones(8, device=DEVICE)
    model_ops.rms_norm(x, w, 1e-6, backend="auto").sum().backward()  # Triton kernels have no backward
    assert x.grad is not None
    with pytest.raises(ValueError, match="backend"):
        model_ops.swiglu(x, x, backend="cuda")
