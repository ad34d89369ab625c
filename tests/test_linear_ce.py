"""Fused linear cross-entropy / log-prob (issue 18, item 3), DESIGN §9 "Fused linear cross-entropy".

Two backends of ``training.linear_cross_entropy`` / ``training.losses.linear_logprobs``: the chunked
torch twin and the Triton kernels (:mod:`ursa_engine.triton_kernels.linear_ce`, on the CPU under
``TRITON_INTERPRET=1`` at tiny sizes), both against autograd of the dense formula
(:mod:`ursa_engine.reference.linear_ce`):

* fp32: loss and both gradients within 1e-5 (relative to the tensors' scale) — per-row weights
  (negative ones too), ignore_index, temperature, z-loss, each reduction (a random per-row incoming
  gradient for "none"), odd shapes (n = 3, K = 97, H = 24) and several K / row / H tiles and chunks;
* bf16: error against an fp64 reference of the same (bf16-valued) inputs at most 2× torch's own
  bf16 error (the dense formula evaluated in bf16). Why the bound holds with room: both backends
  compute the logits in fp32 from exact bf16 products and round only the outputs (and, in the
  kernels, dz to bf16 before its product: relative 2⁻⁹ per term), while torch's bf16 path rounds the
  logits themselves (absolute error ~|z|·2⁻⁹, amplified through exp) and its softmax and matmul outputs;
* a closed form that fails if the backward drops the one-hot or the temperature;
* no (n, K) tensor is ever allocated, no gradient reaches ``weights``, bad input is named.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first @triton.jit decoration
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import ursa_engine as ue  # noqa: E402
from ursa_engine import model_ops, training  # noqa: E402
from ursa_engine.reference import linear_ce as ref  # noqa: E402
from ursa_engine.training.losses import IGNORE_INDEX, linear_cross_entropy, linear_logprobs  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = dict(fp32=1e-5)  # relative to the largest entry of the compared tensor (one place: STYLE, Tests)


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    if request.param == "triton":
        pytest.importorskip("triton")
        reason = model_ops.triton_unavailable(DEVICE)
        if reason is not None:
            pytest.skip(reason)
    return request.param


def problem(n, K, H, *, seed=0, dtype=torch.float32, lead=(), ignore=IGNORE_INDEX, weights=True, wscale=2.0):
    """hidden (*lead, n, H), weight (K, H) (logits of scale ~wscale), targets with a few ignored rows,
    per-row weights with negative entries."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, n, H, generator=g)
    w = torch.randn(K, H, generator=g) * (wscale / H**0.5)
    y = torch.randint(0, K, (*lead, n), generator=g)
    if ignore is not None:
        y.view(-1)[::3] = ignore
    wt = torch.randn(*lead, n, generator=g) if weights else None
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return to(h.to(dtype)).requires_grad_(), to(w.to(dtype)).requires_grad_(), to(y), to(wt)


def grads(out, h, w, seed=1):
    """d(out·g)/d(hidden, weight) with a random incoming gradient g (a scalar for reduced losses)."""
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device, out.dtype)
    return torch.autograd.grad(out, (h, w), g)


def close(got, want, rel, what):
    """max |got − want| ≤ rel · max(|want|, tiny)."""
    err = (got.double() - want.double()).abs().max().item()
    scale = max(want.double().abs().max().item(), 1e-12)
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel:g} × scale {scale:.3g}"


def compare(backend, n, K, H, *, lead=(), chunk_size=5, **opts):
    h, w, y, wt = problem(n, K, H, lead=lead, ignore=opts.get("ignore_index", IGNORE_INDEX))
    opts = dict(dict(weights=wt, temperature=0.7, z_loss=0.01), **opts)
    got = linear_cross_entropy(h, w, y, chunk_size=chunk_size, backend=backend, **opts)
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = ref.linear_cross_entropy(h64, w64, y, **opts)
    assert got.dtype == torch.float32 and got.shape == want.shape
    close(got, want, TOL["fp32"], "loss")
    for a, b, name in zip(grads(got, h, w), grads(want, h64, w64), ("d hidden", "d weight"), strict=True):
        assert a.dtype == torch.float32
        close(a, b, TOL["fp32"], name)


# ------------------------------------------------------------------ against the dense formula
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_dense_autograd_odd_shape(backend, reduction):
    """n = 3, K = 97, H = 24: one partial tile of everything; weights (negative), ignore, T, z-loss."""
    compare(backend, 3, 97, 24, reduction=reduction, chunk_size=2)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_dense_autograd_many_tiles(backend, reduction):
    """(2, 35) rows = 70 > one row tile (64), K = 97 = two code tiles (64), H = 72 = two hidden slices:
    every loop of the three kernels (and 14 chunks of the twin) runs more than once, tails padded."""
    compare(backend, 35, 97, 72, lead=(2,), reduction=reduction, chunk_size=5)


@pytest.mark.parametrize("opts", [dict(weights=None, temperature=1.0, z_loss=0.0), dict(temperature=0.3),
                                  dict(weights=None, z_loss=0.5), dict(ignore_index=5)], ids=str)
def test_matches_dense_autograd_options(backend, opts):
    compare(backend, 20, 40, 16, reduction="mean", **opts)


def test_all_rows_ignored_give_zero_loss_and_gradients(backend):
    h, w, y, _ = problem(4, 33, 16, ignore=None)
    y = torch.full_like(y, IGNORE_INDEX)
    for reduction in ("mean", "sum", "none"):
        out = linear_cross_entropy(h, w, y, reduction=reduction, backend=backend)
        gh, gw = grads(out, h, w)
        assert (out == 0).all() and (gh == 0).all() and (gw == 0).all(), reduction


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_backward_keeps_the_one_hot_and_the_temperature(backend, temperature):
    """Only a bias feature: h_i = e_last, W[:, last] = b, so z_i = b / T and, for one row with target y,
    d loss / d b = (softmax(b / T) − onehot(y)) / T exactly. Dropping the one-hot makes the gradient
    sum to 1/T instead of 0; dropping the temperature scales it by T (0.5: off by 2×)."""
    K, H = 37, 16
    h = torch.zeros(2, H, device=DEVICE)
    h[:, -1] = 1.0
    w = torch.zeros(K, H, device=DEVICE)
    w[:, -1] = torch.randn(K, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    h.requires_grad_(), w.requires_grad_()
    y = torch.tensor([4, IGNORE_INDEX], device=DEVICE)  # the second row weighs 0
    loss = linear_cross_entropy(h, w, y, temperature=temperature, backend=backend)
    gh, gw = torch.autograd.grad(loss, (h, w))
    p = torch.softmax(w.detach()[:, -1] / temperature, 0)
    want = (p - torch.nn.functional.one_hot(torch.tensor(4), K).to(p)) / temperature
    close(gw[:, -1], want, TOL["fp32"], "d bias")
    assert abs(gw[:, -1].sum().item()) < 1e-5
    assert (gw[:, :-1] == 0).all() and (gh[1] == 0).all()
    close(gh[0], want @ w.detach(), TOL["fp32"], "d hidden")


def test_strided_inputs_give_the_contiguous_result(backend):
    """A weight with a row stride of 2H, hidden with a column stride of 2, targets with stride 2."""
    h, w, y, wt = problem(20, 40, 16)
    wide_h = torch.zeros(20, 32, device=DEVICE)
    wide_h[:, ::2] = h.detach()
    wide_w = torch.zeros(40, 32, device=DEVICE)
    wide_w[:, :16] = w.detach()
    wide_y = torch.stack([y, torch.zeros_like(y)], 1)
    hs, ws, ys = wide_h[:, ::2].requires_grad_(), wide_w[:, :16].requires_grad_(), wide_y[:, 0]
    assert hs.stride(1) == 2 and ws.stride(0) == 32 and ys.stride(0) == 2
    want = linear_cross_entropy(h, w, y, weights=wt, reduction="none", backend=backend)
    got = linear_cross_entropy(hs, ws, ys, weights=wt, reduction="none", backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads(got, hs, ws), grads(want, h, w), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ bf16 / fp16
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_error_at_most_twice_torchs_own(backend, dtype):
    """Against an fp64 reference of the same bf16 / fp16 values: loss, d hidden, d weight each within
    2× the error of the dense formula run by torch in that dtype (module docstring: why)."""
    h, w, y, wt = problem(35, 97, 72, lead=(2,), dtype=dtype)
    opts = dict(weights=wt, temperature=0.7, z_loss=0.01, reduction="sum")
    ours = linear_cross_entropy(h, w, y, backend=backend, chunk_size=16, **opts)
    torch_bf16 = ref.linear_cross_entropy(h, w, y, **opts)
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    exact = ref.linear_cross_entropy(h64, w64, y, **opts)
    assert ours.dtype == torch.float32
    ga, gt, ge = grads(ours, h, w), grads(torch_bf16, h, w), grads(exact, h64, w64)
    assert ga[0].dtype == ga[1].dtype == dtype
    for name, a, t, e in (("loss", ours, torch_bf16, exact), ("d hidden", ga[0], gt[0], ge[0]),
                          ("d weight", ga[1], gt[1], ge[1])):
        err = (a.double() - e).abs().max().item()
        own = (t.double() - e).abs().max().item()
        print(f"{backend} {dtype} {name}: error {err:.3g}, torch's own {own:.3g}")
        assert err <= 2 * own, f"{name}: {err:.3g} > 2 × torch's own error {own:.3g}"


# ------------------------------------------------------------------ log-probs
def test_linear_logprobs_are_log_softmax_at_the_targets(backend):
    h, w, y, _ = problem(13, 97, 24, ignore=None, weights=False)
    got = linear_logprobs(h, w, y, temperature=0.8, backend=backend, chunk_size=4)
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = torch.log_softmax(h64 @ w64.T / 0.8, -1).gather(1, y[:, None])[:, 0]
    assert got.dtype == torch.float32 and got.shape == y.shape
    close(got, want, TOL["fp32"], "log-probs")
    for a, b, name in zip(grads(got, h, w), grads(want, h64, w64), ("d hidden", "d weight"), strict=True):
        close(a, b, TOL["fp32"], name)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_twin_passes_gradcheck_in_fp64(reduction):
    """fp64 inputs keep fp64 inside the twin (what replay's gradcheck needs): exact gradients."""
    h, w, y, wt = problem(5, 11, 6)
    h, w, wt = h.detach().double().requires_grad_(), w.detach().double().requires_grad_(), wt.double()

    def fn(a, b):
        return linear_cross_entropy(a, b, y, weights=wt, temperature=0.7, z_loss=0.1, reduction=reduction,
                                    chunk_size=2, backend="torch")

    assert torch.autograd.gradcheck(fn, (h, w))
    assert torch.autograd.gradcheck(lambda a, b: linear_logprobs(a, b, y.clamp_min(0), backend="torch"), (h, w))


# ------------------------------------------------------------------ memory, weights, wiring
class _Sizes(TorchDispatchMode):
    """The largest tensor any op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_tensor_of_n_by_k(backend, reduction):
    """n·K = 6,790 elements is more than any legitimate buffer (K·H = 2,328; a 16-row chunk 1,552)."""
    n, K, H, chunk = 70, 97, 24, 16
    h, w, y, wt = problem(n, K, H)
    with _Sizes() as sizes:
        out = linear_cross_entropy(h, w, y, weights=wt, reduction=reduction, chunk_size=chunk, backend=backend)
        grads(out, h, w)
    assert sizes.largest <= max(K * H, n * H, chunk * K) < n * K, sizes.largest


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_twin_peak_is_one_chunk_block(reduction):
    """Live bytes of forward + backward: one (chunk, K) fp32 block, the fp32 d weight, d hidden and
    per-row vectors — the previous chunk's block is gone before the next one exists."""
    from ursa_engine.memory import LiveBytes

    n, K, H, chunk = 64, 2048, 8, 16
    h, w, y, wt = problem(n, K, H)
    with LiveBytes() as live:
        out = linear_cross_entropy(h, w, y, weights=wt, reduction=reduction, z_loss=0.1, chunk_size=chunk,
                                   backend="torch")
        out.backward(torch.ones_like(out))
    block = chunk * K * 4
    assert live.peak <= block + (K * H + n * H) * 4 + 64 * n < 2 * block, live.peak_tensors


def test_weights_get_no_gradient(backend):
    h, w, y, wt = problem(6, 19, 16)
    wt.requires_grad_()
    out = linear_cross_entropy(h, w, y, weights=wt, reduction="none", backend=backend)
    out.sum().backward()
    assert wt.grad is None and h.grad is not None and w.grad is not None


def test_gradient_only_for_the_inputs_that_need_it(backend):
    h, w, y, _ = problem(6, 19, 16)
    w = w.detach()
    (gh,) = torch.autograd.grad(linear_cross_entropy(h, w, y, backend=backend), (h,))
    h64, w64 = h.detach().double().requires_grad_(), w.double()
    (want,) = torch.autograd.grad(ref.linear_cross_entropy(h64, w64, y), (h64,))
    close(gh, want, TOL["fp32"], "d hidden")


def test_latent_loss_passes_the_backend_through(backend):
    torch.manual_seed(0)
    cfg = ue.ModelConfig.preset("tiny", lm_head_size=32, vocab_size=512 + 32)
    model = ue.URSATransformer(cfg).to(DEVICE)
    x1 = torch.randint(0, 32, (2, 1, 2, 3), device=DEVICE)
    prompt = torch.randint(0, 400, (2, 3), device=DEVICE)
    losses, heads = [], []
    for b in ("torch", backend):
        model.zero_grad()
        loss = training.LatentLoss(model, backend=b)(prompt, x1, x1)
        loss.backward()
        losses.append(loss.detach())
        heads.append(model.lm_head.weight.grad.clone())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(heads[1], heads[0], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="backend"):
        training.LatentLoss(model, backend="cuda")


def test_sequence_parallel_loss_passes_the_backend_through(backend, tmp_path):
    """One rank (gloo): the sequence-parallel loss (a "sum" over its targets, then the global mean)
    equals LatentLoss, on either loss backend."""
    import torch.distributed as dist

    from ursa_engine.distributed import training as ptrain

    torch.manual_seed(0)
    model = ue.URSATransformer(ue.ModelConfig.preset("tiny", lm_head_size=32, vocab_size=512 + 32))
    x1 = torch.randint(0, 32, (2, 1, 2, 3))
    prompt = torch.randint(0, 400, (2, 3))
    ignore = torch.zeros_like(x1, dtype=torch.bool)
    ignore[..., 0] = True
    want = training.LatentLoss(model, backend="torch")(prompt, x1, x1, ignore=ignore)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        flat = x1.reshape(2, -1)
        got = ptrain.SequenceParallelLoss(model, backend=backend)(prompt, flat, flat, (1, 2, 3),
                                                                  ignore=ignore.reshape(2, -1))
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_fake_implementations_allocate_what_the_launchers_return():
    pytest.importorskip("triton")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        h, w = torch.empty(33_280, 2048, dtype=torch.bfloat16), torch.empty(64_000, 2048, dtype=torch.bfloat16)
        y, c = torch.zeros(33_280, dtype=torch.int64), torch.zeros(33_280)
        lse, loss = torch.ops.ursa.linear_ce_forward(h, w, y, None, IGNORE_INDEX, 1.0, 0.0)
        dh, dw = torch.ops.ursa.linear_ce_backward(h, w, y, lse, c, 1.0, 0.0, True, False)
    assert lse.shape == loss.shape == (33_280,) and lse.dtype == loss.dtype == torch.float32
    assert dh.shape == (33_280, 2048) and dh.dtype == torch.float32 and dw.shape == (0,)
    if model_ops.triton_unavailable(DEVICE) is None:  # the real launcher returns the same; torch's op checks
        h, w, y, wt = (t.detach() for t in problem(5, 19, 16))
        torch.library.opcheck(torch.ops.ursa.linear_ce_forward.default, (h, w, y, wt, IGNORE_INDEX, 0.7, 0.1))
        torch.library.opcheck(torch.ops.ursa.linear_ce_backward.default,
                              (h, w, y, torch.randn(5, device=DEVICE), wt, 0.7, 0.1, True, True))
        h, w, y = problem(5, 19, 16, weights=False)[:3]
        real = torch.ops.ursa.linear_ce_forward(h.detach(), w.detach(), y, None, IGNORE_INDEX, 1.0, 0.0)
        back = torch.ops.ursa.linear_ce_backward(h.detach(), w.detach(), y, real[0], torch.ones(5, device=DEVICE),
                                                 1.0, 0.0, False, True)
        assert [(t.shape, t.dtype) for t in real] == [((5,), torch.float32)] * 2
        assert [(t.shape, t.dtype) for t in back] == [((0,), torch.float32), ((19, 16), torch.float32)]


# ------------------------------------------------------------------ bad input
def _bad_cases():
    h, w, y = torch.randn(4, 8), torch.randn(5, 8), torch.tensor([0, 1, 4, IGNORE_INDEX])
    return [
        ("targets", (h, w, torch.tensor([0, 1, 5, 2])), {}),
        ("targets", (h, w, y[:3]), {}),
        ("weight", (h, torch.randn(5, 7), y), {}),
        ("weights", (h, w, y), dict(weights=torch.ones(3))),
        ("weights", (h, w, y), dict(weights=torch.ones(4, dtype=torch.long))),
        ("temperature", (h, w, y), dict(temperature=0.0)),
        ("z_loss", (h, w, y), dict(z_loss=-1.0)),
        ("reduction", (h, w, y), dict(reduction="avg")),
        ("chunk_size", (h, w, y), dict(chunk_size=0)),
        ("backend", (h, w, y), dict(backend="cuda")),
        ("weight", (h, w.double(), y), dict(backend="triton")),
        ("hidden", (h.double(), w.double(), y), dict(backend="triton")),
    ]


@pytest.mark.parametrize("name,args,kw", _bad_cases(), ids=[f"{c[0]}-{i}" for i, c in enumerate(_bad_cases())])
def test_bad_input_is_named(name, args, kw):
    with pytest.raises(ValueError, match=name):
        linear_cross_entropy(*args, **kw)


def test_logprobs_reject_the_ignore_index():
    with pytest.raises(ValueError, match="targets"):
        linear_logprobs(torch.randn(2, 8), torch.randn(5, 8), torch.tensor([0, IGNORE_INDEX]))


def test_triton_on_the_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        linear_cross_entropy(torch.randn(2, 8), torch.randn(5, 8), torch.tensor([0, 1]), backend="triton")
    assert linear_cross_entropy(torch.randn(2, 8), torch.randn(5, 8), torch.tensor([0, 1])).isfinite()  # auto: torch


def test_bench_smoke():
    """benchmarks/bench_linear_ce.py at a tiny size: every provider runs; the twin holds less than dense."""
    from ursa_engine.benchmarks import bench_linear_ce

    out = bench_linear_ce.run(64, 16, 512, chunks=(16,), device="cpu", reps=1, budget_s=0.1)
    assert [(r["provider"], r["chunk"]) for r in out["rows"]] == [("dense", None), ("torch", 16)]
    assert out["rows"][1]["bytes_vs_dense"] < 0.5 and all(r["median_ms"] > 0 for r in out["rows"])


def test_ignored_rows_with_an_infinite_upstream_gradient_stay_out():
    """reduction="none": an ignored row's incoming gradient never reaches d hidden / d weight (no 0·inf)."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(6, 16, generator=g, requires_grad=True)
    W = torch.randn(29, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 29, (6,), generator=g)
    y[2] = training.IGNORE_INDEX
    up = torch.ones(6)
    up[2] = float("inf")
    training.linear_cross_entropy(h, W, y, reduction="none", backend="torch").backward(up)
    assert torch.isfinite(h.grad).all() and torch.isfinite(W.grad).all()
    assert (h.grad[2] == 0).all()


# ------------------------------------------------------------------ CUDA (the gpu marker: benchmarks/gpu_suite.py)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_on_cuda_matches_the_twin_at_a_mid_size(dtype):
    """n = 4,096, H = 512, K = 32,000 on the GPU: the compiled kernels (production tiles: wgmma for bf16,
    an exact dot for fp32; many programs of each kernel, partial K tile) against the chunked torch twin,
    both against autograd of the fp64 dense formula on the same values, with the module docstring's
    bounds: fp32 within 1e-5 of each tensor's scale (and of each other); bf16 within 2× the error of
    the dense formula run by torch in bf16. Also: same bits run to run (each program owns its outputs),
    and no tensor the size of the logits is allocated."""
    n, K, H = 4_096, 32_000, 512
    h, w, y, wt = problem(n, K, H, seed=5, dtype=dtype)
    opts = dict(weights=wt, temperature=0.7, z_loss=1e-3, reduction="mean")
    got = {}
    for backend in ("torch", "triton"):
        loss = linear_cross_entropy(h, w, y, backend=backend, chunk_size=1024, **opts)
        got[backend] = (loss, *grads(loss, h, w))
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    exact = ref.linear_cross_entropy(h64, w64, y, **opts)
    want = (exact, *grads(exact, h64, w64))
    names = ("loss", "d hidden", "d weight")
    if dtype == torch.float32:
        for backend in ("torch", "triton"):
            for a, b, name in zip(got[backend], want, names, strict=True):
                close(a, b, TOL["fp32"], f"{backend} {name}")
        for a, b, name in zip(got["triton"], got["torch"], names, strict=True):
            close(a, b, TOL["fp32"], f"triton vs torch {name}")
    else:
        dense = ref.linear_cross_entropy(h, w, y, **opts)
        own = (dense, *grads(dense, h, w))
        for backend in ("torch", "triton"):
            for a, t, e, name in zip(got[backend], own, want, names, strict=True):
                err = (a.double() - e).abs().max().item()
                bound = 2 * (t.double() - e).abs().max().item()
                assert err <= bound, f"{backend} {name}: {err:.3g} > 2 × torch's own bf16 error ({bound / 2:.3g})"
    again = linear_cross_entropy(h, w, y, backend="triton", **opts)
    for a, b in zip((again, *grads(again, h, w)), got["triton"], strict=True):
        assert torch.equal(a, b)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    grads(linear_cross_entropy(h, w, y, backend="triton", **opts), h, w)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < n * K * h.element_size(), f"{extra} bytes: as much as the logits"


def test_bench_suite_records_ratios_and_turns_an_oom_into_a_skipped_row(tmp_path, monkeypatch):
    """The linear_ce suite (smoke case): each row carries TFLOP/s, peak bytes and its ratios to the FLOP
    floor (10·nHK at 989 TFLOP/s) and to dense; a dense call that runs out of memory is a skipped row
    saying so, and the other providers are still timed. The gpu case is the DESIGN §6 training step,
    with predictions for it in benchmarks/predicted.py."""
    from ursa_engine.benchmarks import bench_linear_ce as B
    from ursa_engine.benchmarks import predicted
    from ursa_engine.benchmarks.harness import Deadline
    from ursa_engine.benchmarks.records import BenchContext, ResultWriter

    header = {"device": {"name": "cpu"}, "software": {}, "commit": "x", "mode": "smoke",
              "created": "2026-01-01T00:00:00Z"}

    def suite(path):
        ctx = BenchContext(suite=B.NAME, mode="smoke", device=torch.device("cpu"), deadline=Deadline(60),
                           ceilings=None, header=header, writer=ResultWriter(path, header, None), quiet=True)
        B.run(ctx)
        return {r["provider"]: r for r in ctx.writer.records}

    (case,) = B.cases("smoke")
    nhk = case.n * case.H * case.K
    rows = suite(tmp_path / "a.json")
    assert set(rows) == {"dense", "torch"} and all(r["status"] == "ok" for r in rows.values())
    for r in rows.values():
        assert r["flop_floor_ms"] == pytest.approx(10 * nhk / 989e12 * 1e3)
        assert r["ratio_to_flop_floor"] == pytest.approx(r["median_ms"] / r["flop_floor_ms"])
        assert r["tflops"] == pytest.approx(6 * nhk / (r["median_ms"] * 1e-3) / 1e12) and r["peak_extra_bytes"] > 0
    assert rows["torch"]["speedup_vs_dense"] == pytest.approx(rows["dense"]["median_ms"] / rows["torch"]["median_ms"])
    assert rows["torch"]["bytes_vs_dense"] == pytest.approx(rows["torch"]["peak_extra_bytes"]
                                                            / rows["dense"]["peak_extra_bytes"])
    real = B.step_fn

    def dense_oom(provider, *args, **kw):
        if provider != "dense":
            return real(provider, *args, **kw)

        def fn(i):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        return fn

    monkeypatch.setattr(B, "step_fn", dense_oom)
    rows = suite(tmp_path / "b.json")
    assert rows["dense"]["status"] == "skipped" and rows["dense"]["reason"].startswith("out of memory")
    assert rows["torch"]["status"] == "ok" and rows["torch"]["ratio_to_dense"] is None
    (gpu,) = B.cases("gpu")
    assert (gpu.n, gpu.H, gpu.K, gpu.dtype) == (33_280, 2_048, 64_000, torch.bfloat16) and gpu.providers[0] == "dense"
    pred = {r["provider"]: r for r in predicted.predicted_rows() if r["suite"] == B.NAME and r["case"] == gpu.name}
    assert set(pred) <= set(gpu.providers) and {"triton", "triton-forward", "dense"} <= set(pred)
    assert pred["triton"]["floor_s"] == pytest.approx(10 * gpu.n * gpu.H * gpu.K / 989e12)
    assert pred["triton-forward"]["predicted_s"] == pytest.approx(12.5e-3, rel=0.05)  # the kernel docstring
