"""Memory plans of whole generations (issue 11) and the custom ops they run on.

* :func:`ursa_engine.memory.plan_generation` at the sizes of issue 11's "done when": 1.7B, 13 × 40 × 64
  FSQ video with guidance in bf16 peaks at ≤ 8 GB with the weights, and no phase creates a tensor of
  D·K elements; the 1024² IBQ image plan likewise has none; the check itself finds the buffer when
  the head is told to keep whole logits.
* the ``torch.library`` registrations (:mod:`ursa_engine.ops_library`) pass ``torch.library.opcheck``:
  schema, fake implementation (same outputs as the real kernel), functionalization.
* ``ursa-engine plan``.
"""

import json

import pytest
import torch

import ursa_engine as ue
from ursa_engine import _dispatch, ops_library
from ursa_engine.memory import LiveBytes, plan_generation

GB = 1e9


@pytest.fixture(scope="module")
def video_plan():
    return plan_generation("ursa-1.7b", (13, 40, 64), dtype=torch.bfloat16, cfg=True)


def test_1p7b_video_plan_peaks_below_8gb_with_no_dk_buffer(video_plan):
    p = video_plan
    n, K = 13 * 40 * 64, 64_000
    assert (p.rows, p.latent_tokens, p.codebook_size, p.seq_len) == (2, n, K, 320 + 1 + n)
    assert p.peak_bytes <= 8 * GB
    assert p.weight_bytes["transformer"] == ue.ModelConfig.preset("ursa-1.7b").num_params() * 2
    assert p.phases["weights"]["peak_bytes"] >= sum(p.weight_bytes.values())
    assert set(p.phases) >= {"weights", "inputs", "activations", "activations/attention", "activations/mlp",
                             "head + sampler", "decode"}
    assert p.dk_elements == n * K and p.dk_buffers == [] and p.dk_tensors == []  # per pass: one sample's logits
    for name, phase in p.phases.items():
        assert phase["most_elements"]["numel"] < n * K, name
        assert phase["largest"]["bytes"] > 0 and phase["peak_bytes"] <= p.peak_bytes
    assert p.head == "fused" and p.sampler == "triton" and p.mlp_chunks > 1
    head = p.phases["head + sampler"]
    assert head["peak_bytes"] < p.phases["activations"]["peak_bytes"]  # the logits no longer set the peak
    assert "plan: ursa-1.7b" in p.table() and json.loads(p.to_json())["peak_bytes"] == p.peak_bytes


def test_ibq_image_plan_has_no_dk_buffer():
    p = plan_generation("ursa-1.7b", (64, 64), decode=True)
    assert (p.codebook, p.codebook_size, p.latents_shape, p.tokenizer) == ("ibq", 131_072, [1, 64, 64],
                                                                            "IBQTokenizer")
    assert p.dk_buffers == [] and p.weight_bytes["codebook"] == 131_072 * 256 * 4
    assert p.phases["decode"]["peak_bytes"] > p.phases["inputs"]["peak_bytes"]


def test_the_dk_check_finds_whole_logits():
    """The check is not vacuous: a head told to keep every token's logits at once creates (rows, n, K)."""
    kw = dict(codebook="fsq", head="chunked", decode=False)
    whole = plan_generation("ursa-0.6b", (1, 8, 8), logits_budget=None, **kw)
    # (at n = 64 latent tokens, n·K is below the MLP's activations of the 385-token sequence: those are listed
    # too; at real sizes no activation comes near n·K, see the video plan)
    assert whole.dk_buffers[-1] == "head + sampler/lm_head" and whole.head_chunks == 1
    assert [t["numel"] for t in whole.dk_tensors if t["phase"].startswith("head")] == [2 * 64 * 64_000]
    ranged = plan_generation("ursa-0.6b", (1, 8, 8), logits_budget=2 * 16 * 64_000 * 2, **kw)
    assert ranged.head_chunks == 4
    assert ranged.phases["head + sampler"]["largest"]["shape"] == [2, 16, 64_000]
    # one pass's logits of a sample under CFG ((2, 32, K): n·K elements) is caught, though below 2·n·K
    halves = plan_generation("ursa-0.6b", (1, 8, 8), logits_budget=2 * 32 * 64_000 * 2, **kw)
    head = [t["numel"] for t in halves.dk_tensors if t["phase"].startswith("head")]
    assert halves.head_chunks == 2 and head == [2 * 32 * 64_000] * 2
    assert [t for t in ranged.dk_tensors if t["phase"].startswith("head")] == []


def test_every_allocation_of_the_step_is_in_a_phase_and_attention_is_the_cuda_choice():
    p = plan_generation("ursa-0.6b", (1, 8, 8), codebook="fsq", decode=False)
    assert p.unphased_bytes == 0 and p.phases["step"]["allocated_bytes"] > 0
    nested = sum(p.phases[k]["allocated_bytes"] for k in ("activations", "head + sampler"))
    assert p.phases["step"]["allocated_bytes"] == nested + p.phases["step"]["own_allocated_bytes"]
    cfg = ue.ModelConfig.preset("ursa-0.6b")
    from ursa_engine.attention import flash_unavailable

    if flash_unavailable(torch.device("cuda"), torch.bfloat16, cfg.head_dim) is None:
        assert p.attention_backend == "flash" and p.kv_expansion_bytes == 0
        return
    # SDPA on CUDA expands k / v to the query heads (GQA 16 / 8): counted, and named in the label
    expand = 2 * p.rows * cfg.num_attention_heads * p.seq_len * cfg.head_dim * 2
    assert p.attention_backend == "sdpa" and p.kv_expansion_bytes == expand and "expanded" in p.attention
    big = p.phases["activations/attention"]["largest"]
    assert big["shape"] == [p.rows, cfg.num_attention_heads, p.seq_len, cfg.head_dim] or big["bytes"] >= expand // 2


# ----------------------------------------------------------------------------- the custom ops
def _native_or_skip():
    reason = _dispatch.why_not("native", "metric_step", torch.device("cpu"), {})
    if reason is not None:
        pytest.skip(reason)


def _step_args(K=64, D=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond, uncond = torch.randn(D, K, generator=g), torch.randn(D, K, generator=g)
    x = torch.randint(0, K, (D,), generator=g)
    params = torch.tensor([0.1, 2.0, 3.0, 0.5])
    return cond, uncond, x, params, torch.tensor([3]), torch.tensor([5, 6])


def test_sampler_custom_ops_pass_opcheck():
    _native_or_skip()
    cond, uncond, x, params, step, seeds = _step_args()
    table = ue.Codebook.fsq((4, 4, 4)).normalized
    out, error = torch.empty_like(x), torch.zeros(1, dtype=torch.int32)
    common = dict(test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    torch.library.opcheck(torch.ops.ursa.metric_step.default,
                          ("native", cond, uncond, x, table, params, step, seeds, 3, 2.0, 1.0, 0, 1.0, 2, [4, 4, 4],
                           False, False, 0, None, out, error), **common)
    torch.library.opcheck(torch.ops.ursa.mixture_step.default,
                          ("native", cond, None, x, params, step, seeds, 3, 1.0, 1.0, 0, 1.0, False, False, 2, None,
                           None, out, None), **common)
    torch.library.opcheck(torch.ops.ursa.mask_step.default,
                          ("native", None, None, x, params, step, 63, seeds, 3, 1.0, 1.0, 0, 1.0, False, False, 0,
                           x.flip(0), 64, out, error), **common)


def test_dispatch_hands_out_the_custom_op_with_the_backend_signature():
    _native_or_skip()
    cond, uncond, x, params, step, seeds = _step_args()
    fn = _dispatch.resolve("mixture_step", "native", torch.device("cpu"))
    assert fn is ops_library.sampler_op("mixture_step", "native")
    from ursa_engine import _native

    kw = dict(seeds=seeds, row_len=3, guidance_scale=2.0)
    assert torch.equal(fn(cond, uncond, x, params, step, **kw), _native.mixture_step(cond, uncond, x, params, step,
                                                                                     **kw))
    assert _dispatch.resolve("mixture_step", "torch", torch.device("cpu")).__module__ == "ursa_engine.reference.sampler"


def test_as_gpu_makes_gpu_choices_without_running_anything():
    cpu = torch.device("cpu")
    from ursa_engine import model_ops

    assert model_ops.resolve_backend("auto", cpu) == "torch"
    with ops_library.as_gpu():
        assert model_ops.resolve_backend("auto", cpu) == "triton"
        assert _dispatch.auto_order(cpu)[0] == "triton"
        assert ops_library.head_draw_unavailable(cpu) is None
    assert not ops_library.gpu_planning()


def test_model_custom_ops_pass_opcheck():
    pytest.importorskip("triton")
    from ursa_engine.model_ops import triton_unavailable

    if triton_unavailable(torch.device("cpu")) is not None:
        pytest.skip(triton_unavailable(torch.device("cpu")))
    g = torch.Generator().manual_seed(0)
    x, r, w = torch.randn(2, 3, 16, generator=g), torch.randn(2, 3, 16, generator=g), torch.rand(16, generator=g)
    q, k = torch.randn(1, 3, 4, 8, generator=g), torch.randn(1, 3, 2, 8, generator=g)
    cos, sin = torch.rand(3, 4, generator=g), torch.rand(3, 4, generator=g)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.ursa.rms_norm.default, (x, w, 1e-6), test_utils=utils)
    torch.library.opcheck(torch.ops.ursa.add_rms_norm.default, (x, r, w, 1e-6), test_utils=utils)
    torch.library.opcheck(torch.ops.ursa.qk_norm_rope.default, (q, k, w[:8], w[:8], cos, sin, 1e-6),
                          test_utils=utils)
    torch.library.opcheck(torch.ops.ursa.swiglu.default, (x, r), test_utils=utils)


def test_workspace_is_counted_while_the_op_runs():
    """A declared workspace adds to the live bytes during the op only: the table metric step's
    buffers as its launcher allocates them on this device (no x̂1 buffer: ``x1`` is given)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from ursa_engine.triton_kernels.workspaces import table_step_workspace

    with FakeTensorMode():
        D, K, m = 1000, 4096, 16
        x, table = torch.zeros(D, dtype=torch.long), torch.empty(K, m)
        out, x1 = torch.empty_like(x), torch.zeros(D, dtype=torch.long)
        params, step, seeds = torch.empty(4), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
        with LiveBytes(workspace=ops_library.workspace_buffers) as mem, mem.phase("step"):
            ops_library.sampler_op("metric_step", "triton")(None, None, x, table, params, step, seeds=seeds,
                                                            row_len=D, x1=x1, out=out)
    want = table_step_workspace(D, K, m, torch.device("cpu"), torch.float32, x1_given=True)
    assert "x1" not in {b.name for b in want.buffers}
    assert mem.peak == want.peak_bytes() > D * 8 and mem.current == 0
    assert mem.phases["step"].largest["shape"] == list(want.buffers[2].shape)  # the tile sums


# ----------------------------------------------------------------------------- command line
def test_cli_plan_prints_a_table_and_json(capsys):
    from ursa_engine.cli import main

    args = ["plan", "--preset", "ursa-0.6b", "--latents-shape", "1", "8", "8", "--codebook", "fsq", "--no-decode"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "head + sampler" in text and "(n, K) buffers" in text
    assert main([*args, "--json", "--no-cfg", "--head", "chunked"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["rows"] == 1 and doc["cfg"] is False and doc["head"] == "chunked"
    assert doc["dk_buffers"][-1] == "head + sampler/lm_head"  # 64 tokens' logits fit the budget: one range
    assert main(["plan", "--preset", "ursa-9b"]) == 2
    assert "--preset" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["cosmos3d", "ibq"])
def test_plan_of_a_checkpoint_root_reads_its_configs_only(tmp_path, family):
    from roots import write_tiny_root

    root = write_tiny_root(tmp_path / family, family=family)
    p = plan_generation(root=root, latents_shape=(2, 3, 4) if family == "cosmos3d" else (4, 6), dtype=torch.float32)
    cfg = ue.ModelConfig.from_json(root / "transformer" / "config.json")
    assert p.model == str(root) and p.codebook_size == cfg.lm_head_size
    assert p.codebook == ("fsq" if family == "cosmos3d" else "table")
    assert p.tokenizer == ("CosmosFSQTokenizer" if family == "cosmos3d" else "IBQTokenizer")
    assert p.weight_bytes["transformer"] == cfg.num_params() * 4 and "decode" in p.phases
