"""``torch.compile(fullgraph=True)`` of one engine step body (issue 11): no graph break anywhere.

The body is the one CUDA graphs capture (:meth:`ursa_engine.graphs.LoopState.body` with the step
index in a tensor): transformer, head + sampler by token range, tokens written back into the ids.
On the CPU with the reference ops (dynamo traces them as python), and with our custom ops
(:mod:`ursa_engine.ops_library`: native sampler, Triton model ops and the fused head under the
interpreter; each one opaque node). Backend ``aot_eager`` (functionalization, no code generation:
seconds); the compiled step must give the eager step's tokens.
"""

import pytest
import torch

import ursa_engine as ue
from ursa_engine.graphs import LoopState
from ursa_engine.model import latent_positions, sequence_ids
from ursa_engine.tokenizer import pad_prompt_ids

CFG = ue.ModelConfig.preset("tiny")
P, SHAPE, B = 8, (2, 3, 4), 2
N = 24


def _state(sched, **engine_options) -> LoopState:
    torch.manual_seed(0)
    model = ue.URSATransformer(CFG, init_std=0.2)
    eng = ue.Engine(model, sched, prompt_length=P, mode="eager", attn_backend="sdpa",
                    logits_budget=5 * 2 * B * 64 * 4, **engine_options)  # 5-token ranges: several per step
    cond = pad_prompt_ids([[11, 12, 13], [40, 41]], CFG.pad_token_id, P)
    neg = pad_prompt_ids([[7, 7]], CFG.pad_token_id, P).expand(B, -1)
    x = eng.initial_tokens(B, SHAPE, seed=3).reshape(B, N)
    ids = sequence_ids(torch.cat([cond, neg]), x.repeat(2, 1), CFG)
    rope = model.rope_tables(latent_positions(P, SHAPE))
    opts = {"guidance_scale": 3.0, "guidance_trunc": 0.9, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    state = LoopState(eng, sched, ids, x, rope, torch.arange(B) + 3, None, opts, False, N, B)
    eng.configure(state, 2 * B)
    return state


def _compiled_equals_eager(state: LoopState) -> None:
    k = torch.tensor(1)
    x0, ids0 = state.x.clone(), state.ids.clone()
    state.body(k, 2 * B)  # eager (also loads the backend modules, as a warm-up before capture does)
    eager = state.x.clone()
    state.x.copy_(x0)
    state.ids.copy_(ids0)
    torch._dynamo.reset()
    body = torch.compile(state.body, fullgraph=True, backend="aot_eager")  # raises on any graph break
    body(k, 2 * B)
    assert torch.equal(state.x, eager)
    assert torch.equal(state.ids[:B, -N:], eager + CFG.lm_vocab_size)


@pytest.mark.parametrize("path", ["metric", "mask"])
def test_step_body_compiles_fullgraph_with_reference_ops(path):
    sched = (ue.Scheduler(ue.MetricPath(ue.Codebook.fsq((4, 4, 4)), alpha=1.0, c=5.0), 4) if path == "metric"
             else ue.Scheduler(ue.MaskPath(64, mask_id=63), 4))
    state = _state(sched, sampler_backend="torch", ops_backend="torch", head="chunked")
    assert len(state.chunks(2 * B)) > 1
    _compiled_equals_eager(state)


def test_step_body_compiles_fullgraph_with_our_custom_ops():
    from ursa_engine import _dispatch
    from ursa_engine.model_ops import triton_unavailable
    from ursa_engine.ops_library import head_draw_unavailable

    cpu = torch.device("cpu")
    reasons = [r for r in (_dispatch.why_not("native", "metric_step", cpu, {}), triton_unavailable(cpu),
                           head_draw_unavailable(cpu)) if r is not None]
    if reasons:
        pytest.skip("; ".join(reasons))
    sched = ue.Scheduler(ue.MetricPath(ue.Codebook.fsq((4, 4, 4)), alpha=1.0, c=5.0), 4)
    state = _state(sched, sampler_backend="native", ops_backend="triton", head="fused")
    assert state.fused_head
    _compiled_equals_eager(state)
