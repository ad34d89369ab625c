"""Peak memory of the torch reference sampler at production size (D = 66,560, K = 64,000, bf16
logits), counted on fake tensors: its row chunks (``CHUNK_BYTES``) leave no (D, K) float64 buffer."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ursa_engine.memory import LiveBytes
from ursa_engine.reference import sampler as ref

D_VIDEO, K_COSMOS = 2 * 33_280, 64_000  # 49×320×512 video latents (two samples), Cosmos FSQ codebook
F64_DK = D_VIDEO * K_COSMOS * 8  # one (D, K) float64 buffer: 34 GB
PEAK_LIMIT = 2 * 2**30


def _fake_peak(run) -> int:
    """Peak live bytes above the inputs of ``run(inputs)`` on fake tensors at production size."""
    with FakeTensorMode():
        D, K = D_VIDEO, K_COSMOS
        inputs = dict(cond=torch.empty(D, K, dtype=torch.bfloat16), uncond=torch.empty(D, K, dtype=torch.bfloat16),
                      x=torch.zeros(D, dtype=torch.int64), table=torch.empty(K, 6), params=torch.zeros(4),
                      step=torch.zeros(1, dtype=torch.int64), seeds=torch.zeros(2, dtype=torch.int64),
                      beta=torch.ones(D, dtype=torch.float64))
        with LiveBytes() as mem:
            run(inputs)
    return mem.peak


def _metric(options, checked=False):
    def run(i):
        if checked:  # the error buffer is made inside the fake mode, like the inputs
            options["error"] = torch.zeros(1, dtype=torch.int32)
        ref.metric_step(i["cond"], i["uncond"], i["x"], i["table"], i["params"], i["step"], seeds=i["seeds"],
                        row_len=D_VIDEO // 2, guidance_scale=3.0, **options)
    return run


def _confidence(i):
    R2, L2 = 2, D_VIDEO // 2
    ref.mask_confidence_step(i["cond"].view(R2, L2, K_COSMOS), i["uncond"].view(R2, L2, K_COSMOS), i["x"].view(R2, L2),
                             mask_id=K_COSMOS - 1, n_unmasked=torch.full((R2,), 1000), noise_scale=3.0,
                             seeds=i["seeds"], row_len=L2, step=torch.tensor(3), guidance_scale=3.0, top_p=0.9)


def _sample(i):
    ref.metric_sample(i["x"], i["beta"], i["table"], seeds=i["seeds"], row_len=D_VIDEO // 2)


ALLOCATION_CASES = {
    "metric_step_guided_checked": _metric({}, checked=True),
    "metric_step_top_p": _metric(dict(top_p=0.9)),
    "metric_step_top_k_last": _metric(dict(top_k=50, temperature=0.9, last=True)),
    "metric_sample": _sample,
    "mask_confidence_step": _confidence,
}


@pytest.mark.parametrize("case", list(ALLOCATION_CASES))
def test_reference_ops_need_no_d_by_k_buffer_at_production_size(case):
    peak = _fake_peak(ALLOCATION_CASES[case])
    assert peak < PEAK_LIMIT, f"{case}: peak {peak / 2**30:.2f} GiB; a (D, K) float64 buffer: {F64_DK / 2**30:.0f} GiB"


def test_the_allocation_check_sees_a_d_by_k_buffer(monkeypatch):
    """The control: one chunk of all D rows (the unchunked reference) peaks above a (D, K) float64 buffer."""
    monkeypatch.setattr(ref, "CHUNK_BYTES", 2**62)
    assert _fake_peak(_metric({})) >= F64_DK
