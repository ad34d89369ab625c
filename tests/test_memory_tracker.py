"""LiveBytes (ursa_engine.memory): live tensor bytes of a computation, on real and on fake tensors.

The true answers are computed by hand (known op sequences, a two-conv network) or by the same
tracker on real tensors (a fake run must give exactly the bytes the real run holds).
"""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode
from ursa_engine.benchmarks.bench_vae import COSMOS_TINY, IBQ_TINY

from ursa_engine.memory import CUDA_GRANULARITY, LiveBytes, plan_decode, plan_encode
from ursa_engine.memory.plan import CUSTOM_FLOPS
from ursa_engine.vae import CosmosFSQTokenizer, IBQTokenizer

F32 = 4


def _sequence(mem: LiveBytes) -> torch.Tensor:
    """Ops whose live bytes are known: the comments give the live count after each line."""
    with mem.phase("build"):
        a = torch.empty(1000)  # a: 4,000
        b = a * 2  # a, b: 8,000
        c = b.view(10, 100)  # a view: no new storage, 8,000
        c.add_(1)  # in place: 8,000
        del a  # b: 4,000
    with mem.phase("grow"):
        d = c + 1  # b, d: 8,000
        torch.add(c, 1, out=d)  # out= an existing storage: 8,000
        e = torch.cat([b, d.flatten()])  # b, d, e: 16,000 (the peak)
        del b, c  # the view kept b's storage alive until now: d, e = 12,000
        f = e[:10].clone()  # d, e, f: 12,040
        del e  # d, f: 4,040
    return d + f.sum()  # d, f, g: 8,040 (f is freed when the function returns)


def test_live_bytes_counts_a_known_sequence_exactly():
    mem = LiveBytes()
    with mem:
        g = _sequence(mem)
        assert mem.current == 1000 * F32  # g alone: d and f died with the function's frame
    assert mem.peak == 4000 * F32
    assert mem.peak_at == {"phase": "grow", "module": None, "op": "cat.default"}
    assert mem.phases["build"].peak == 2000 * F32 and mem.phases["build"].end == 1000 * F32
    assert mem.phases["grow"].start == 1000 * F32 and mem.phases["grow"].peak == 4000 * F32
    assert mem.allocated == F32 * (1000 + 1000 + 1000 + 2000 + 10 + 1 + 1000)
    del g
    gc.collect()
    assert mem.current == 0  # every storage it counted has been freed, and seen freed


def test_storages_that_existed_before_are_never_counted():
    weight = torch.randn(256, 256)
    mem = LiveBytes()
    with mem:
        view = weight.t()  # a view of a resident tensor
        weight.mul_(0.5)  # in place on it
        torch.mul(weight, 2, out=weight)  # out= on it
        assert mem.peak == 0
        y = view @ weight  # a new storage
    assert mem.peak == mem.current == 256 * 256 * F32
    del y
    assert mem.current == 0


def test_a_tracked_storage_resized_by_an_out_op_grows():
    mem = LiveBytes()
    with mem:
        out = torch.empty(0)
        torch.add(torch.ones(100), 1, out=out)  # the temporary ones(100) is freed at once
    assert mem.current == 100 * F32 and mem.peak == 200 * F32
    del out
    assert mem.current == 0


def test_granularity_rounds_every_storage_up():
    mem = LiveBytes(granularity=CUDA_GRANULARITY)
    with mem:
        a = torch.empty(1)  # 4 bytes -> one 512-byte block
        b = torch.empty(129)  # 516 bytes -> two blocks
    assert mem.peak == 3 * 512
    del a, b
    with pytest.raises(ValueError, match="granularity"):
        LiveBytes(granularity=0)


@pytest.mark.parametrize("fake", [False, True], ids=["real", "fake"])
def test_fake_runs_count_what_real_runs_hold(fake):
    mem = LiveBytes()
    ctx = FakeTensorMode() if fake else torch.no_grad()
    with ctx:
        with mem:
            g = _sequence(mem)
        assert isinstance(g, torch.Tensor)
    assert mem.peak == 4000 * F32 and mem.peak_at["phase"] == "grow"
    assert {k: (v.start, v.peak, v.end) for k, v in mem.phases.items()} == {
        "build": (0, 2000 * F32, 1000 * F32), "grow": (1000 * F32, 4000 * F32, 1010 * F32)}
    del g
    assert mem.current == 0


def test_a_two_conv_network_peaks_at_both_activations_by_hand():
    """x (resident) -> conv1 -> SiLU in place -> conv2: conv1's output is still referenced by
    Sequential while conv2 writes its own, so the peak is both activations, in conv2."""
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.SiLU(inplace=True), nn.Conv2d(16, 8, 3, padding=1))
    x = torch.randn(2, 3, 20, 24)
    mem = LiveBytes()
    with torch.no_grad(), mem, mem.track_modules(net, "net"):
        y = net(x)
    act1, act2 = 2 * 16 * 20 * 24 * F32, 2 * 8 * 20 * 24 * F32
    assert mem.peak == act1 + act2 and mem.current == act2
    assert mem.peak_at["module"] == "net.2"
    assert [t["bytes"] for t in mem.peak_tensors] == [act1, act2]
    assert y.shape == (2, 8, 20, 24)


def _real_decode_peak(tok, ids, chunk_frames):
    mem = LiveBytes()
    with mem, mem.track_modules(tok):
        out = tok.decode(ids, chunk_frames=chunk_frames)
    return mem, out


@pytest.mark.parametrize("chunk_frames", [0, 1, None], ids=["plain", "chunk1", "default"])
@pytest.mark.parametrize("family", ["cosmos3d", "ibq"])
def test_planned_decode_peak_equals_the_real_decode_peak(family, chunk_frames):
    """The same tracker on the real decode and on a fake one (plan_decode): the same bytes."""
    cls, cfg, shape = ((CosmosFSQTokenizer, COSMOS_TINY, (1, 3, 4, 4)) if family == "cosmos3d"
                       else (IBQTokenizer, IBQ_TINY, (2, 2, 6, 5)))
    torch.manual_seed(0)
    tok = cls(cfg).eval()
    ids = torch.randint(0, tok.codebook_size, shape)
    real, out = _real_decode_peak(tok, ids, chunk_frames)
    plan = plan_decode(cls, cfg, shape, dtype=torch.float32, chunk_frames=chunk_frames, granularity=1)
    assert plan.peak_bytes == real.peak > 0
    assert plan.peak_module == real.peak_at["module"] and plan.peak_op == real.peak_at["op"]
    assert plan.output_shape == list(out.shape) and plan.output_bytes == out.numel() * out.element_size()
    # total bytes written may differ a little: CPU kernels and their meta twins do not always pick the same
    # memory format (channels-last codes from the IBQ table), and a later op then copies in one run only
    assert abs(real.allocated - plan.allocated_bytes) <= 0.05 * real.allocated
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS) as flops:
        tok.decode(ids, chunk_frames=chunk_frames)
    assert plan.flops == flops.get_total_flops() > 0


def test_one_frame_chunks_lower_the_planned_peak_of_a_tile():
    """The authors' video tokenizer on one tile (5 latent frames): the causal temporal convs read
    chunk + halo frames instead of a padded copy of the whole tile."""
    shape = (1, 5, 8, 8)
    plain = plan_decode(CosmosFSQTokenizer, None, shape, dtype=torch.float32, chunk_frames=0, count_flops=False)
    one = plan_decode(CosmosFSQTokenizer, None, shape, dtype=torch.float32, chunk_frames=1, count_flops=False)
    assert one.peak_bytes < plain.peak_bytes and one.output_shape == plain.output_shape == [1, 3, 17, 64, 64]
    with torch.device("meta"):
        params = sum(p.numel() for p in CosmosFSQTokenizer().parameters())
    assert plain.weight_bytes == F32 * params


def test_planned_encode_peak_equals_the_real_encode_peak():
    torch.manual_seed(0)
    tok = CosmosFSQTokenizer(COSMOS_TINY).eval()
    pixels = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    mem = LiveBytes()
    with mem:
        codes = tok.encode(pixels, chunk_frames=0)
    plan = plan_encode(CosmosFSQTokenizer, COSMOS_TINY, tuple(pixels.shape), dtype=torch.float32, chunk_frames=0,
                       granularity=1)
    assert plan.output_shape == list(codes.shape) == [1, 3, 4, 4]
    assert plan.peak_bytes == mem.peak


def test_real_size_video_decode_plan_runs_on_the_cpu_in_seconds():
    """The authors' video tokenizer on 13 x 40 x 64 codes (49 x 320 x 512 pixels), bf16, fake."""
    plan = plan_decode(CosmosFSQTokenizer, {"sample_frames": 49}, (1, 13, 40, 64))
    assert plan.output_shape == [1, 3, 49, 320, 512]
    act = 512 * 13 * 80 * 128 * 2  # one whole-clip activation of the last 512-channel stage
    assert 4 * act < plan.peak_bytes < 12 * act
    assert plan.peak_module.startswith("decoder.") and plan.flops > 5e12
    with pytest.raises(ValueError, match="attention"):
        plan_decode(CosmosFSQTokenizer, None, (1, 1, 2, 2), attention="flash")
