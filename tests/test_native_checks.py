"""The native backend's validation bits (``error=``) and memory bounds (no (D, K) buffer) (DESIGN §7)."""

import pytest
import torch

from ursa_engine import _native as nat
from ursa_engine.memory import LiveBytes
from ursa_engine.reference import sampler as ref

if nat.unavailable("cpu") is not None:
    pytest.skip(nat.unavailable("cpu"), allow_module_level=True)

from native_cases import _C, DEVICES, _codebook, _gen, _step_inputs  # noqa: E402

# ----------------------------------------------------------------------------- error bits (error=)
ERR_NAMES = ["ERR_X_RANGE", "ERR_COND_NAN", "ERR_COND_POSINF", "ERR_COND_ALL_NEGINF", "ERR_UNCOND_NAN",
             "ERR_UNCOND_POSINF", "ERR_UNCOND_ALL_NEGINF", "ERR_X1_RANGE"]
ERR = dict(_C.errors)


def test_error_bits_equal_the_python_constants():
    """csrc/include/ursa/errors.h against ursa_engine.reference.sampler (the one definition)."""
    missing = [n for n in ERR_NAMES if not hasattr(ref, n)]
    if missing:
        pytest.skip(f"the reference does not define {missing} yet")
    assert ERR == {n: getattr(ref, n) for n in ERR_NAMES}
    if nat.unavailable("cuda") is None:
        assert dict(nat._load("cuda")[0].errors) == ERR


BAD = {  # name -> (what to spoil, expected bits)
    "cond_nan": ("cond", float("nan"), "ERR_COND_NAN"),
    "cond_posinf": ("cond", float("inf"), "ERR_COND_POSINF"),
    "cond_all_neginf": ("cond", "row", "ERR_COND_ALL_NEGINF"),
    "uncond_nan": ("uncond", float("nan"), "ERR_UNCOND_NAN"),
    "uncond_posinf": ("uncond", float("inf"), "ERR_UNCOND_POSINF"),
    "uncond_all_neginf": ("uncond", "row", "ERR_UNCOND_ALL_NEGINF"),
    "nan_in_a_neginf_block": ("cond", "block", "ERR_COND_NAN"),  # the block max is −inf: its own scan
    "nan_at_the_mask_id": ("cond", "mask", "ERR_COND_NAN"),  # overwritten by −inf in z: caught anyway
    "x_negative": ("x", -1, "ERR_X_RANGE"),
    "x_too_large": ("x", 10**9, "ERR_X_RANGE"),
    "x1_too_large": ("x1", 2500, "ERR_X1_RANGE"),
}


ERR_CASES = [(op, bad) for op in ("metric_step", "mixture_step", "mask_step", "metric_step_argmax", "top_k")
             for bad in BAD if op == "mask_step" or BAD[bad][1] != "mask"]  # the mask id: the mask step's only


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op, bad", ERR_CASES)
def test_step_error_bits_name_the_bad_values_and_nothing_else(device, dtype, op, bad):
    """K = 2500 (three blocks of 1024 codes); every token reads its logits (last step or all jump)."""
    D, K, tok = 64, 2500, 37
    mask_id = K - 1
    cond, uncond, x = _step_inputs(D, K, dtype, 40, device)
    x = torch.where(x == mask_id, 0, x)
    what, value, name = BAD[bad]
    x1 = None
    if what in ("cond", "uncond"):
        z = cond if what == "cond" else uncond
        if value == "row":
            z[tok] = -torch.inf
        elif value == "block":
            z[tok, 1024:2048] = -torch.inf
            z[tok, 1500] = torch.nan
        elif value == "mask":
            z[tok, mask_id] = torch.nan
        else:
            z[tok, 1234] = value
    elif what == "x":
        x[tok] = value
    else:
        x1 = torch.randint(0, K, (D,), generator=_gen(41)).to(device)
        x1[tok] = value
    params = torch.tensor([0.5, 2.0, 8.0, 50.0], device=device)  # mixture / mask: every token moves
    step = torch.tensor([3], device=device)
    err = torch.zeros(1, dtype=torch.int32, device=device)
    kw = dict(seeds=torch.tensor([8], device=device), row_len=D, guidance_scale=2.0, x1=x1, error=err)
    table = _codebook("table").normalized_on(device)
    if op in ("metric_step", "metric_step_argmax", "top_k"):
        table = torch.nn.functional.normalize(torch.randn(K, 4, generator=_gen(42)), dim=-1).to(device)
        opts = {"metric_step_argmax": dict(last=True, argmax_last=True), "top_k": dict(top_k=40)}.get(op, {})
        out = nat.metric_step(cond, uncond, x, table, params, step, **opts, **kw)
    elif op == "mixture_step":
        out = nat.mixture_step(cond, uncond, x, params, step, **kw)
    else:
        xm = x.clone()
        if what != "x":  # half the tokens masked, the spoiled one among them (its row is read)
            xm[::2] = mask_id
            xm[tok] = mask_id
        out = nat.mask_step(cond, uncond, xm, params, step, mask_id=mask_id, **kw)
    expected = ERR[name] if not (x1 is not None and what in ("cond", "uncond")) else 0
    assert int(err) == expected, (hex(int(err)), name)
    assert out.shape == (D,)
    if what == "x" and op.startswith("metric_step") and not op.endswith("argmax"):
        assert int(out[tok]) == value  # a bad id is kept, never used as an address
    clean = torch.zeros(1, dtype=torch.int32, device=device)
    if what in ("x", "x1"):
        return
    z = cond if what == "cond" else uncond
    z.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    nat.mixture_step(cond, uncond, x, params, step, seeds=kw["seeds"], row_len=D, error=clean)
    assert int(clean) == 0


def test_mixture_step_checks_only_the_rows_it_reads():
    """A token that keeps its id never reads its logits: a NaN there is not reported."""
    D, K = 2000, 97
    cond, _, x = _step_inputs(D, K, torch.float32, 43, "cpu")
    params, step, seeds = torch.tensor([0.1, 0.0, 0.0, 1.0]), torch.tensor([2]), torch.tensor([9])
    moved = nat.mixture_step(cond, None, x, params, step, seeds=seeds, row_len=D, x1=torch.full_like(x, -1)) == -1
    assert 0 < moved.sum() < D
    for rows, expected in [(~moved, 0), (moved, ERR["ERR_COND_NAN"])]:
        z = cond.clone()
        z[rows.nonzero()[0]] = torch.nan
        err = torch.zeros(1, dtype=torch.int32)
        nat.mixture_step(z, None, x, params, step, seeds=seeds, row_len=D, error=err)
        assert int(err) == expected


def test_error_word_is_only_ored_and_must_be_int32_on_the_tokens_device():
    cond, _, x = _step_inputs(10, 97, torch.float32, 44, "cpu")
    params, step = torch.tensor([0.1, 0.0, 0.0, 1.0]), torch.tensor([2])
    err = torch.tensor([1 << 20], dtype=torch.int32)
    cond[3, 5] = torch.inf
    nat.mixture_step(cond, None, x, params, step, seeds=torch.tensor([1]), row_len=10, last=True, error=err)
    assert int(err) == (1 << 20) | ERR["ERR_COND_POSINF"]
    for bad in (torch.zeros(1, dtype=torch.int64), torch.zeros(2, dtype=torch.int32)):
        with pytest.raises(ValueError, match="error"):
            nat.mixture_step(cond, None, x, params, step, seeds=torch.tensor([1]), row_len=10, error=bad)


# ----------------------------------------------------------------------------- memory
def test_top_k_step_allocates_chunks_of_the_budget_never_a_D_by_K_buffer(monkeypatch):
    """D·K = 4096 × 500: 8 MB of float32 z; the budget (64 KiB) allows 16 rows of float64 per chunk."""
    D, K = 4096, 500
    table = torch.nn.functional.normalize(torch.randn(K, 5, generator=_gen(50)), dim=-1)
    cond, uncond, x = _step_inputs(D, K, torch.bfloat16, 51, "cpu")
    args = (cond, uncond, x, table, torch.tensor([0.2, 2.0, 9.0, 0.0]), torch.tensor([3]))
    kw = dict(seeds=torch.tensor([5, 6]), row_len=D // 2, guidance_scale=3.0, top_k=20, top_p=0.95)
    whole = nat.metric_step(*args, **kw)  # default budget: one chunk here
    budget = 64 << 10
    monkeypatch.setattr(ref, "CHUNK_BYTES", budget)
    with LiveBytes() as mem:
        chunked = nat.metric_step(*args, **kw)
    assert torch.equal(chunked, whole)
    assert max(t["bytes"] for t in mem.peak_tensors) <= budget
    assert mem.peak <= 6 * budget + D * 8  # a few chunk buffers and the (D,) result


def test_top_p_step_plan_at_video_size_holds_no_D_by_K_buffer(monkeypatch):
    """D = 66,560 (CFG video), K = 64,000 bf16 on fake tensors; the kernel call is stubbed (no data)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    calls = []
    monkeypatch.setattr(nat, "_launch", lambda mod, fn, **kw: calls.append((kw["x"].numel(), kw["index_offset"])))
    D, K = 66_560, 64_000
    with FakeTensorMode():
        cond = torch.empty(D, K, dtype=torch.bfloat16)
        uncond = torch.empty(D, K, dtype=torch.bfloat16)
        x = torch.empty(D, dtype=torch.int64)
        params, step = torch.empty(4), torch.empty(1, dtype=torch.int64)
        seeds, err = torch.empty(2, dtype=torch.int64), torch.empty(1, dtype=torch.int32)
        with LiveBytes() as mem:
            nat.mixture_step(cond, uncond, x, params, step, seeds=seeds, row_len=D // 2, guidance_scale=7.0,
                             top_p=0.9, error=err)
    rows = ref.CHUNK_BYTES // (8 * K)
    assert sum(n for n, _ in calls) == D and max(n for n, _ in calls) <= rows
    assert max(t["bytes"] for t in mem.peak_tensors) <= ref.CHUNK_BYTES
    # a few float64 chunk buffers of the filter (the softmax, the sort's values and indices): 1.5 GiB at most,
    # where one (D, K) float32 buffer is 17 GB
    assert mem.peak <= 6 * ref.CHUNK_BYTES
