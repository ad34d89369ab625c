"""The training API (ursa_engine.training): noising with per-frame times, timesteps, chunked loss."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import ursa_engine as ue
from ursa_engine import training
from ursa_engine.model import latent_positions, sequence_ids


def tiny_model(K=32, seed=0):
    torch.manual_seed(seed)
    cfg = ue.ModelConfig.preset("tiny", lm_head_size=K, vocab_size=512 + K)
    return ue.URSATransformer(cfg)


def paths(K=32):
    emb = torch.randn(K, 5, generator=torch.Generator().manual_seed(0))
    return {"metric": ue.MetricPath(ue.Codebook(emb), alpha=1.0, c=3.0),
            "mixture": ue.MixturePath(K, "linear"), "mask": ue.MaskPath(K, K - 1, "linear")}


@pytest.mark.parametrize("kind", ["metric", "mixture", "mask"])
def test_add_noise_per_frame_times_match_path_sample(kind):
    path = paths()[kind]
    x1 = torch.randint(0, 31, (3, 4, 2, 5), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([[0.0, 0.3, 0.7, 1.0]]).expand(3, 4)
    seeds = torch.tensor([5, 6, 7])
    got = training.add_noise(path, x1, t, seed=seeds, backend="torch")
    want = path.sample(x1, ue.frame_times_to_tokens(t, (4, 2, 5)), seed=seeds, backend="torch")
    assert torch.equal(got, want)
    assert torch.equal(got[:, 3], x1[:, 3])  # t = 1 keeps x1
    per_sample = training.add_noise(path, x1, torch.tensor([1.0, 1.0, 1.0]), seed=0)
    assert torch.equal(per_sample, x1)


def test_add_noise_names_bad_times():
    with pytest.raises(ValueError, match="t"):
        training.add_noise(paths()["mixture"], torch.zeros(2, 3, dtype=torch.long), torch.full((2, 3), 1.5))


def test_sample_frame_times_async_and_sync():
    t = training.sample_frame_times(4, 3, shift=3.0, seed=torch.arange(4))
    assert t.shape == (4, 3) and ((t > 0) & (t < 1)).all()
    assert (t[:, 0] != t[:, 1]).any()  # one time per frame
    s = training.sample_frame_times(4, 3, shift=3.0, seed=0, asynchronous=False)
    assert (s == s[:, :1]).all()
    assert torch.equal(s[:, 0], ue.sample_timesteps((4,), shift=3.0, seed=0))


def test_linear_cross_entropy_matches_dense_value_and_grads():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 37, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(29, 16, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 29, (2, 37), generator=g)
    y[0, :5] = training.IGNORE_INDEX
    loss = training.linear_cross_entropy(h, w, y, chunk_size=8)
    ref = F.cross_entropy((h @ w.T).reshape(-1, 29), y.reshape(-1), ignore_index=training.IGNORE_INDEX)
    gh, gw = torch.autograd.grad(3 * loss, (h, w))
    rh, rw = torch.autograd.grad(3 * ref, (h, w))
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)  # fp32 logits inside
    torch.testing.assert_close(gh, rh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-6)


def test_latent_hidden_gives_the_model_latent_logits():
    model = tiny_model()
    x = torch.randint(0, 32, (2, 2, 3, 4))
    prompt = torch.randint(0, 400, (2, 5))
    ids = sequence_ids(prompt, x, model.config)
    pos = latent_positions(5, (2, 3, 4))
    h = training.latent_hidden(model, ids, pos, 24)
    torch.testing.assert_close(model.lm_head(h), model(ids, pos, latent_tokens=24))
    full = model(ids, pos)
    torch.testing.assert_close(model.lm_head(h), full[:, 5:-1])  # BOV predicts latent 0


def test_latent_loss_trains_and_compiles():
    model = tiny_model()
    net = training.LatentLoss(model, chunk_size=7)
    x1 = torch.randint(0, 32, (2, 2, 2, 3))
    x_t = training.add_noise(paths()["mixture"], x1, torch.tensor([[0.2, 0.9], [0.5, 0.1]]), seed=1)
    prompt = torch.randint(0, 400, (2, 3))
    loss = net(prompt, x_t, x1)
    ids = sequence_ids(prompt, x_t, model.config)
    ref = F.cross_entropy(model(ids, latent_positions(3, (2, 2, 3)), latent_tokens=12).reshape(-1, 32).float(),
                          x1.reshape(-1))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    loss.backward()
    assert model.lm_head.weight.grad is not None and model.model.embed_tokens.weight.grad is not None
    compiled = torch.compile(net, backend="aot_eager", fullgraph=False)
    torch.testing.assert_close(compiled(prompt, x_t, x1), loss.detach(), rtol=1e-5, atol=1e-5)
    ignore = torch.zeros_like(x1, dtype=torch.bool)
    ignore[:, 0] = True  # e.g. given frames
    part = net(prompt, x_t, x1, ignore=ignore)
    ref_part = F.cross_entropy(model(ids, latent_positions(3, (2, 2, 3)), latent_tokens=12)[:, 6:].reshape(-1, 32),
                               x1[:, 1].reshape(-1))
    torch.testing.assert_close(part, ref_part, rtol=1e-5, atol=1e-5)


def test_latent_loss_under_ddp(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = tiny_model()
        net = DDP(training.LatentLoss(model))
        x1 = torch.randint(0, 32, (2, 1, 2, 3))
        x_t = training.add_noise(paths()["metric"], x1, 0.5, seed=torch.tensor([0, 1]))
        loss = net(torch.randint(0, 400, (2, 3)), x_t, x1)
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
    finally:
        dist.destroy_process_group()


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm_.default)  # addmm_: grad_w += gᵀh
        return func(*args, **(kwargs or {}))


def test_linear_cross_entropy_skips_gradient_work_under_no_grad():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(20, 8, generator=g, requires_grad=True)
    w = torch.randn(11, 8, generator=g, requires_grad=True)
    y = torch.randint(0, 11, (20,), generator=g)
    with _CountMatmuls() as grad_mode:
        want = training.linear_cross_entropy(h, w, y, chunk_size=5)
    with torch.no_grad(), _CountMatmuls() as eval_mode:
        got = training.linear_cross_entropy(h, w, y, chunk_size=5)
    assert grad_mode.count == 3 * 4  # logits, grad_h, grad_w per chunk
    assert eval_mode.count == 4  # the logits only: no gradient accumulators
    assert not got.requires_grad
    torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)


def test_latent_loss_validates_ids_and_prompt_shape():
    net = training.LatentLoss(tiny_model())
    x1 = torch.randint(0, 32, (2, 1, 2, 3))
    prompt = torch.randint(0, 400, (2, 3))
    with pytest.raises(ValueError, match="x_t"):
        net(prompt, x1 + 32, x1)
    with pytest.raises(ValueError, match="x1"):
        net(prompt, x1, x1 - 1 - x1.max())
    with pytest.raises(ValueError, match="prompt_ids"):
        net(prompt[:1], x1, x1)
    with pytest.raises(ValueError, match="prompt_ids"):
        net(prompt[0], x1, x1)
    with pytest.raises(ValueError, match="prompt_ids"):
        net(prompt + 10_000, x1, x1)
    h, w = torch.randn(4, 16), torch.randn(5, 16)
    with pytest.raises(ValueError, match="targets"):
        training.linear_cross_entropy(h, w, torch.tensor([0, 1, 5, training.IGNORE_INDEX]))
    training.linear_cross_entropy(h, w, torch.tensor([0, 1, 4, training.IGNORE_INDEX]))  # ignore is fine


def test_latent_loss_leaves_the_models_ops_backend_alone(monkeypatch):
    model = tiny_model()
    model.ops_backend = "auto"
    seen = []
    inner = model.hidden_states

    def spy(*args, **kwargs):
        seen.append(kwargs.get("ops_backend"))
        return inner(*args, **kwargs)

    monkeypatch.setattr(model, "hidden_states", spy)
    net = training.LatentLoss(model)
    x1 = torch.randint(0, 32, (1, 1, 2, 2))
    net(torch.randint(0, 400, (1, 3)), x1, x1)
    assert model.ops_backend == "auto"  # an Engine sharing the model keeps its fast ops
    assert seen == ["torch"]  # the training backend is passed per call
