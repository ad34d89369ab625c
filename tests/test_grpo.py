"""GRPO on the digits model (issue 18 item 4): the objective by hand, LoRA, the reward, a smoke run.

The full run is a benchmark (``benchmarks/results/grpo-digits-cpu-*``); here a shortened run checks
that the pieces fit together: rollouts, replay, the update, the checkpoint and the report.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import ursa_engine as ue
from ursa_engine import demo, digits
from ursa_engine.model import latent_positions, sequence_ids
from ursa_engine.training import grpo, lora, rewards

pytest.importorskip("sklearn")


# ------------------------------------------------------------------ the objective
def test_group_advantages_match_hand_values():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.2, 0.4, 0.6, 0.8], [0.5, 0.5, 0.5, 0.5]])
    eps = 1e-4
    adv = grpo.group_advantages(r, eps)
    # group 0: mean 0.5, population std 0.5; group 1: mean 0.5, std sqrt(0.05); group 2: no spread
    s1 = (0.05) ** 0.5
    want = torch.tensor([[0.5, -0.5, -0.5, 0.5], [-0.3, -0.1, 0.1, 0.3], [0.0, 0.0, 0.0, 0.0]])
    want /= torch.tensor([[0.5 + eps], [s1 + eps], [eps]])
    torch.testing.assert_close(adv, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="rewards"):
        grpo.group_advantages(torch.ones(4))


def test_clipped_objective_matches_hand_values():
    eps = 0.2
    ratios = torch.tensor([[1.5, 0.5], [1.5, 0.5], [1.1, 0.9]], dtype=torch.float64)  # (B=3, 2 tokens)
    adv = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    old = torch.tensor([[-1.0, -2.0], [-0.5, -3.0], [-1.5, -0.25]], dtype=torch.float64)
    logp = (old + ratios.log()).requires_grad_(True)
    loss, stats = grpo.clipped_objective(logp, old, adv, eps)
    # −min(r·A, clip(r)·A): A=+1: r=1.5 -> −1.2 (clipped), r=0.5 -> −0.5; A=−1: r=1.5 -> +1.5, r=0.5 -> +0.8
    # (clipped); A=2: r=1.1 -> −2.2, r=0.9 -> −1.8
    want = np.mean([-1.2, -0.5, 1.5, 0.8, -2.2, -1.8])
    assert float(loss.detach()) == pytest.approx(want, abs=1e-12)
    assert stats["clip_frac"] == pytest.approx(4 / 6)  # |r − 1| > ε, whether or not the min picked it
    loss.backward()
    # d/dlogp of −r·A/n where unclipped (r·A picked), 0 where the clipped branch is the min
    grad = torch.tensor([[0.0, -0.5], [1.5, 0.0], [-2.2, -1.8]], dtype=torch.float64) / 6
    torch.testing.assert_close(logp.grad, grad)


def test_clipped_objective_k3_penalty_and_mask():
    old = torch.zeros(2, 3)
    logp = torch.tensor([[0.0, -0.1, 0.2], [0.3, 0.0, -0.4]])
    ref = torch.tensor([[0.0, 0.1, 0.0], [0.0, 0.5, 0.0]])
    adv = torch.zeros(2)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    loss, stats = grpo.clipped_objective(logp, old, adv, 0.2, ref_logp=ref, kl_coef=0.5, mask=mask)
    d = (ref - logp)[mask]
    k3 = (d.exp() - d - 1).mean()
    assert float(loss) == pytest.approx(0.5 * float(k3), rel=1e-6)
    assert stats["kl"] == pytest.approx(float(k3), rel=1e-6) and float(k3) > 0
    with pytest.raises(ValueError, match="ref_logp"):
        grpo.clipped_objective(logp, old, adv, 0.2, kl_coef=0.1)


# ------------------------------------------------------------------ LoRA
@pytest.fixture(scope="module")
def base_model():
    return ue.URSATransformer.from_pretrained(demo.DEFAULT_ROOT / "transformer", dtype=torch.float64)


def _logits(model):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.config.lm_head_size, (2, 1, 4, 8), generator=g)
    ids = sequence_ids(digits.prompt_ids([3, 7], model.config.pad_token_id), x, model.config)
    return model(ids, latent_positions(2, (1, 4, 8)), latent_tokens=32)


def test_lora_fresh_adapter_is_identity_and_merge_equals_unmerged(base_model, tmp_path):
    model = ue.URSATransformer.from_pretrained(demo.DEFAULT_ROOT / "transformer", dtype=torch.float64)
    base = _logits(model).detach()
    adapter = lora.LoRAAdapter(model, 4, alpha=8, targets=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"))
    torch.testing.assert_close(_logits(model).detach(), base, rtol=0, atol=0)  # B = 0
    with torch.no_grad():
        for b in adapter.lora_B.values():
            b.normal_(std=0.05, generator=torch.Generator().manual_seed(1))
    unmerged = _logits(model).detach()
    assert (unmerged - base).abs().max() > 1e-2
    with adapter.disabled():
        torch.testing.assert_close(_logits(model).detach(), base, rtol=0, atol=0)
    adapter.save_pretrained(tmp_path / "adapter")
    adapter.merge()
    torch.testing.assert_close(_logits(model).detach(), unmerged, rtol=1e-10, atol=1e-10)
    # only the targeted rows of the fused q/k/v moved: k rows are the base's
    cfg = model.config
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    w, w0 = model.model.layers[0].self_attn.qkv_proj.weight, base_model.model.layers[0].self_attn.qkv_proj.weight
    assert torch.equal(w[q : q + kv], w0[q : q + kv]) and not torch.equal(w[:q], w0[:q])

    # PEFT layout, and loading it onto a fresh base model gives the same logits unmerged
    cfg_json = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg_json["r"] == 4 and cfg_json["lora_alpha"] == 8 and cfg_json["peft_type"] == "LORA"
    keys = set(adapter.peft_state_dict())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.3.mlp.down_proj.lora_B.weight" in keys
    assert not any("k_proj" in k or "gate_proj" in k or "qkv" in k for k in keys)
    fresh = ue.URSATransformer.from_pretrained(demo.DEFAULT_ROOT / "transformer", dtype=torch.float64)
    lora.LoRAAdapter.from_pretrained(fresh, tmp_path / "adapter")
    torch.testing.assert_close(_logits(fresh).detach(), unmerged, rtol=1e-10, atol=1e-10)


def test_lora_rejects_bad_arguments(base_model):
    with pytest.raises(ValueError, match="rank"):
        lora.LoRAAdapter(base_model, 0)
    with pytest.raises(ValueError, match="targets"):
        lora.LoRAAdapter(base_model, 2, targets=("qkv_proj",))


# ------------------------------------------------------------------ the reward
def test_digit_probability_rewards_the_prompted_class():
    images, labels = digits.load_digits_array()
    idx = np.arange(0, len(images), 9)[:100]
    frames = np.stack([digits.data.place(images[i], 4) for i in idx])[:, None]  # (100, 1, 8, 16)
    right = rewards.digit_probability(frames, labels[idx])
    wrong = rewards.digit_probability(frames, (labels[idx] + 1) % 10)
    assert right.shape == (100,) and right.dtype == np.float32
    assert right.mean() > 0.85 and wrong.mean() < 0.05
    probs = rewards.digit_probability_classifier().predict_proba(frames)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    assert rewards.demo_accuracy(frames, labels[idx]).mean() > 0.9
    with pytest.raises(ValueError, match="pixels"):
        rewards.digit_probability(frames[:3], labels[:4])


# ------------------------------------------------------------------ the whole run, shortened
def test_grpo_smoke_run_writes_a_loadable_checkpoint_and_report(tmp_path):
    cfg = grpo.GRPOConfig(iterations=2, prompts=2, group_size=3, num_steps=4, replay_steps=(0, 1), lr=1e-3,
                          kl_coef=0.1, inner_epochs=2, minibatches=2, eval_per_class=1, demo_steps=4)
    report = grpo.run(tmp_path, cfg, threads=1, log=lambda *a: None)
    for key in ("reward_before", "reward_after", "ci95_before", "ci95_after", "minutes", "curve", "config",
                "accuracy_before", "accuracy_after", "demo_accuracy_before", "demo_accuracy_after"):
        assert key in report
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["config"]["group_size"] == 3 and len(saved["curve"]) == 2 and saved["n_eval"] == 10
    assert all(0.0 <= c["reward"] <= 1.0 and np.isfinite(c["loss"]) for c in saved["curve"])
    assert all(c["kl"] >= 0.0 for c in saved["curve"]) and saved["curve"][1]["kl"] > 0  # θ left the base
    assert (tmp_path / "reward.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    engine = ue.Engine.from_pretrained(tmp_path / "checkpoint", device="cpu", dtype=torch.float32, prompt_length=2)
    base = ue.URSATransformer.from_pretrained(demo.DEFAULT_ROOT / "transformer")
    moved = [not torch.equal(a, b) for a, b in zip(engine.model.state_dict().values(),
                                                    base.state_dict().values(), strict=True)]
    assert any(moved)
    out = engine.generate(digits.prompt_ids([4], 1), latents_shape=(1, 4, 8), guidance_scale=1.0, num_steps=4,
                          decode=False)
    assert out.tokens.shape == (1, 1, 4, 8)
    assert demo.DigitsModel.load(tmp_path / "checkpoint").meta == demo.DigitsModel.load().meta


def test_grpo_lora_run_saves_adapter_and_merged_checkpoint(tmp_path):
    cfg = grpo.GRPOConfig(iterations=1, prompts=2, group_size=2, num_steps=4, replay_steps=(0,), lr=1e-2,
                          lora_rank=2, eval_per_class=1, demo_steps=4)
    grpo.run(tmp_path, cfg, threads=1, log=lambda *a: None)
    base = ue.URSATransformer.from_pretrained(demo.DEFAULT_ROOT / "transformer")
    merged = ue.URSATransformer.from_pretrained(tmp_path / "checkpoint" / "transformer")
    before = _logits(base).detach()
    adapter = lora.LoRAAdapter.from_pretrained(base, tmp_path / "adapter")  # unmerged, on the base weights
    assert any(b.abs().max() > 0 for b in adapter.lora_B.values())  # the update reached the adapter
    torch.testing.assert_close(_logits(merged).detach(), _logits(base).detach(), rtol=1e-5, atol=1e-5)
    assert (_logits(merged).detach() - before).abs().max() > 1e-6


def test_grpo_raises_a_simple_reward_on_held_out_seeds(tmp_path):
    """The update's sign and the replay's alignment: ink (mean brightness) is easy to raise in a few steps."""

    def ink(pixels, labels):
        return np.asarray(pixels, np.float32).reshape(len(labels), -1).mean(1)

    cfg = grpo.GRPOConfig(iterations=4, prompts=2, group_size=8, num_steps=6, lr=1e-3, eval_per_class=4,
                          demo_steps=4)
    threads = torch.get_num_threads()
    report = grpo.run(tmp_path, cfg, reward_fn=ink, threads=1, log=lambda *a: None)
    assert torch.get_num_threads() == threads  # restored
    assert report["reward_delta"] > 2 * report["ci95_delta_paired"] > 0, report


def test_grpo_cli_help():
    out = subprocess.run([sys.executable, "-m", "ursa_engine.training.grpo", "--help"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert "--lora-rank" in out and "--replay-steps" in out and "--out" in out
