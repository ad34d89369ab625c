"""The planned memory of one training step (issue 18 item 3: ursa_engine.memory.plan_training_step).

* activation checkpointing (``URSATransformer.gradient_checkpointing``) changes no loss or gradient;
* the plan on fake tensors holds the bytes a real CPU run of the same step holds (LiveBytes on both);
* the (n, K) check finds whole logits when a dense loss makes them, and none in LatentLoss's step;
* checkpointing lowers the planned peak; the 1.7B video step at real size has no (n, K) buffer;
* ``adamw_step`` is torch.optim.AdamW's update; ``ursa-engine plan --training``.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ursa_engine as ue
from ursa_engine.memory import LiveBytes, plan_training_step
from ursa_engine.memory.training import adamw_state, adamw_step
from ursa_engine.model import URSATransformer, latent_positions, sequence_ids
from ursa_engine.training import LatentLoss

GB = 1e9
TINY = ue.ModelConfig.preset("tiny")  # K = 64; embedding 576 x 64 = 36,864 elements


def _batch(cfg, latents, *, B=2, P=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, cfg.lm_vocab_size, (B, P), generator=g)
    x_t = torch.randint(0, cfg.lm_head_size, (B, *latents), generator=g)
    x1 = torch.randint(0, cfg.lm_head_size, (B, *latents), generator=g)
    return prompt, x_t, x1


def _tiny_model(dtype=torch.float32):
    torch.manual_seed(0)
    return URSATransformer(TINY, dtype=dtype)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model = _tiny_model()
    net = LatentLoss(model)
    batch = _batch(TINY, (2, 3, 4))
    grads = {}
    for on in (False, True):
        model.gradient_checkpointing = on
        model.zero_grad(set_to_none=True)
        loss = net(*batch)
        loss.backward()
        grads[on] = (loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()})
    assert torch.equal(grads[True][0], grads[False][0])
    assert grads[True][1].keys() == grads[False][1].keys()
    for name, g in grads[False][1].items():
        assert torch.equal(grads[True][1][name], g), name
        assert g.abs().sum() > 0 or "embed" in name, name  # every layer takes part
    with torch.no_grad():  # inference: no checkpoint, same logits
        ids = sequence_ids(batch[0], batch[1], TINY)
        pos = latent_positions(batch[0].shape[1], (2, 3, 4))
        on = model(ids, pos, latent_tokens=24)
        model.gradient_checkpointing = False
        assert torch.equal(on, model(ids, pos, latent_tokens=24))


def _real_step_bytes(cfg, latents, *, B, P, checkpointing, master):
    """The step of plan_training_step on real tensors: weights and optimizer state made first (resident),
    then inputs, forward, backward and the AdamW update under LiveBytes."""
    torch.manual_seed(0)
    model = URSATransformer(cfg, dtype=torch.float32)
    model.gradient_checkpointing = checkpointing
    net = LatentLoss(model)
    params = [p for p in model.parameters() if p.requires_grad]
    states = adamw_state(params, master_weights=master)
    resident = sum(p.numel() * 4 for p in model.parameters()) + sum(t.numel() * 4 for s in states for t in s.values())
    mem = LiveBytes()
    with mem:
        batch = _batch(cfg, latents, B=B, P=P)
        with mem.phase("forward"):
            loss = net(*batch)
        with mem.phase("backward"):
            loss.backward()
        with mem.phase("optimizer"):
            adamw_step(params, states, step=2)
            for p in params:
                p.grad = None
    return mem, resident


@pytest.mark.parametrize("checkpointing,master", [(True, False), (False, True)], ids=["ckpt", "no-ckpt-master"])
def test_planned_step_holds_the_bytes_of_the_real_step(checkpointing, master):
    latents, B, P = (2, 4, 6), 2, 5
    real, resident = _real_step_bytes(TINY, latents, B=B, P=P, checkpointing=checkpointing, master=master)
    plan = plan_training_step(TINY, latents, batch=B, prompt_length=P, dtype=torch.float32, gpu=False,
                              checkpointing=checkpointing, master_weights=master, count_flops=False, granularity=1)
    assert plan.resident_bytes == resident
    assert plan.peak_above_resident_bytes == real.peak > 0
    real_phase = real.peak_at["phase"]  # the real run's "forward" holds the plan's "forward" and "loss"
    assert plan.peak_at["op"] == real.peak_at["op"]
    assert plan.peak_phase == real_phase or (real_phase, plan.peak_phase) == ("forward", "loss")
    assert plan.optimizer_state_bytes == TINY.num_params() * 4 * (3 if master else 2)
    assert plan.gradient_bytes == plan.weight_bytes == TINY.num_params() * 4
    assert plan.master_weights is master and plan.checkpointing is checkpointing


class DenseLoss(nn.Module):
    """Whole (B, n, K) logits, then F.cross_entropy: what the (n, K) check is for."""

    def __init__(self, model):
        super().__init__()
        self.model = model.requires_grad_(True)

    def forward(self, prompt_ids, x_t, x1):
        cfg = self.model.config
        ids = sequence_ids(prompt_ids, x_t, cfg)
        pos = latent_positions(prompt_ids.shape[1], tuple(x1.shape[1:]))
        logits = self.model(ids, pos, latent_tokens=x1[0].numel())
        return F.cross_entropy(logits.flatten(0, 1).float(), x1.flatten())


def test_the_nk_check_finds_dense_logits_and_none_in_latent_loss():
    # K = 512 > the widest activation (192): n·K = 192 · 512 = 98,304 exceeds every parameter and activation
    cfg, latents = ue.ModelConfig.preset("tiny", lm_head_size=512, vocab_size=1024), (3, 8, 8)
    kw = dict(batch=1, prompt_length=4, dtype=torch.float32, count_flops=False)
    dense = plan_training_step(cfg, latents, loss=DenseLoss, **kw)
    assert dense.nk_elements == 192 * 512 and dense.largest_parameter_elements < dense.nk_elements
    assert dense.has_nk_buffer and {b["phase"] for b in dense.nk_buffers} == {"loss", "backward"}
    logits = [b for b in dense.nk_buffers if b["module"] == "lm_head"]
    assert [(b["shape"], b["phase"]) for b in logits] == [([192, 512], "loss")]
    # LatentLoss as a GPU runs it (the fused CE where registered) and as this CPU does (the chunked torch twin,
    # one (chunk, K) fp32 block at a time: 64 rows here, as 2,048 rows are far below n = 33,280 at real size)
    for gpu in (True, False):
        chunked = plan_training_step(cfg, latents, loss=lambda m: LatentLoss(m, chunk_size=64), gpu=gpu, **kw)
        assert chunked.nk_buffers == [] and not any("cannot tell" in note for note in chunked.notes), gpu


def test_checkpointing_lowers_the_planned_peak():
    cfg = ue.ModelConfig.preset("tiny", hidden_size=256, intermediate_size=768, num_hidden_layers=6, head_dim=64,
                                lm_head_size=4096, vocab_size=512 + 4096)
    kw = dict(dtype=torch.bfloat16, count_flops=False)
    on = plan_training_step(cfg, (4, 16, 16), checkpointing=True, **kw)
    off = plan_training_step(cfg, (4, 16, 16), checkpointing=False, **kw)
    exact = on.weight_bytes + on.optimizer_state_bytes  # the plan rounds each storage up to 512 bytes
    assert on.resident_bytes == off.resident_bytes and exact <= on.resident_bytes < exact + 512 * 4 * 400
    assert on.saved_bytes < off.saved_bytes / 4
    assert on.peak_above_resident_bytes < off.peak_above_resident_bytes
    assert on.phases["backward/attention"]["peak_bytes"] > 0 and "backward/attention" not in off.phases


@pytest.fixture(scope="module")
def video_step():
    return plan_training_step("ursa-1.7b", (13, 40, 64))


def test_1p7b_video_training_step_has_no_nk_buffer(video_step):
    p = video_step
    n, K, params = 13 * 40 * 64, 64_000, ue.ModelConfig.preset("ursa-1.7b").num_params()
    assert (p.latent_tokens, p.codebook_size, p.seq_len, p.dtype) == (n, K, 320 + 1 + n, "bfloat16")
    assert p.nk_elements == n * K and p.nk_buffers == [] and not p.has_nk_buffer
    for name in ("forward", "loss", "backward", "optimizer"):
        assert p.phases[name]["most_elements"]["numel"] < n * K, name
    # bf16 weights and gradients, fp32 master + two moments: 2 + 12 resident, 2 in the step
    assert p.weight_bytes == 2 * params and p.gradient_bytes == 2 * params
    assert p.optimizer_state_bytes == 12 * params and p.master_weights and p.checkpointing
    assert p.resident_bytes >= 14 * params and p.peak_bytes == p.resident_bytes + p.peak_above_resident_bytes
    assert p.peak_phase in ("loss", "backward") and p.peak_above_resident_bytes > p.gradient_bytes
    assert p.flops > 3 * p.forward_flops  # forward, backward (twice the forward) and the layers' recompute
    doc = json.loads(p.to_json())
    assert doc["has_nk_buffer"] is False and doc["peak_bytes"] == p.peak_bytes
    assert "(n, K) buffers" in p.table() and "none" in p.table()


def test_adamw_step_is_torch_adamw():
    g = torch.Generator().manual_seed(0)
    ours = [torch.randn(5, 7, generator=g), torch.randn(300, generator=g)]
    ref = [nn.Parameter(p.clone()) for p in ours]
    opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, foreach=False)
    states = adamw_state(ours, master_weights=False)
    for step in (1, 2, 3):
        grads = [torch.randn(p.shape, generator=g) for p in ours]
        for p, r, gr in zip(ours, ref, grads, strict=True):
            p.grad, r.grad = gr.clone(), gr.clone()
        adamw_step(ours, states, step=step, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, chunk=64)
        opt.step()
        for p, r in zip(ours, ref, strict=True):
            torch.testing.assert_close(p, r.detach(), rtol=1e-6, atol=1e-7)
    # master weights: the fp32 copy is updated, the bf16 parameter receives its rounding
    half = [torch.randn(40, generator=g).bfloat16()]
    st = adamw_state(half, master_weights=True)
    half[0].grad = torch.randn(40, generator=g).bfloat16()
    adamw_step(half, st, step=1, lr=1e-2)
    assert st[0]["master"].dtype == torch.float32 and torch.equal(half[0], st[0]["master"].bfloat16())
    with pytest.raises(ValueError, match="step"):
        adamw_step(half, st, step=0)


def test_cli_plan_training_prints_the_peak_and_the_verdict(capsys):
    from ursa_engine.cli import main

    # the CLI takes the generation plan's sizes: K = 64,000 (FSQ)
    args = ["plan", "--training", "--preset", "tiny", "--latents-shape", "2", "6", "6", "--prompt-length", "8"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "training plan: tiny" in text and "(n, K) buffers" in text and "above the resident" in text
    assert main([*args, "--json", "--no-checkpointing", "--optimizer", "none", "--dtype", "float32"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["checkpointing"] is False and doc["optimizer"] is None and doc["optimizer_state_bytes"] == 0
    # the verdict as planned (72 tokens fit one row chunk of the torch twin, whose (72, K) block is then n·K)
    assert doc["has_nk_buffer"] is bool(doc["nk_buffers"]) and doc["latent_tokens"] == 72 and doc["model"] == "tiny"
    assert "optimizer" not in doc["phases"] and doc["peak_phase"] in ("forward", "loss", "backward")
    assert main([*args, "--head", "fused"]) == 2
    assert "--head" in capsys.readouterr().err
