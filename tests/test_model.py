"""URSATransformer: logits against independent implementations, positions, backends, dtypes."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import ursa_engine as ue
from ursa_engine.model import ModelConfig, URSATransformer, latent_positions, sequence_ids

TINY = ModelConfig.preset("tiny")
REL_FP32 = 1e-4  # max |a − b| / max |b| against a float64 independent implementation


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def random_checkpoint(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under Qwen3 names, built here from the DESIGN §3 list (not the model's code)."""
    g = torch.Generator().manual_seed(seed)
    h, d, hq, hkv, i = (cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads,
                        cfg.intermediate_size)

    def rnd(*shape, std=0.08):
        return torch.randn(*shape, generator=g) * std

    def gain(n):  # norm weights away from 1 so that a skipped or misplaced norm shows
        return 1 + 0.3 * torch.randn(n, generator=g)

    w = {"model.embed_tokens.weight": rnd(cfg.vocab_size, h, std=1.0), "model.norm.weight": gain(h),
         "lm_head.weight": rnd(cfg.lm_head_size, h)}
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        w.update({p + "self_attn.q_proj.weight": rnd(hq * d, h), p + "self_attn.k_proj.weight": rnd(hkv * d, h),
                  p + "self_attn.v_proj.weight": rnd(hkv * d, h), p + "self_attn.o_proj.weight": rnd(h, hq * d),
                  p + "self_attn.q_norm.weight": gain(d), p + "self_attn.k_norm.weight": gain(d),
                  p + "mlp.gate_proj.weight": rnd(i, h), p + "mlp.up_proj.weight": rnd(i, h),
                  p + "mlp.down_proj.weight": rnd(h, i), p + "input_layernorm.weight": gain(h),
                  p + "post_attention_layernorm.weight": gain(h)})
    return w


def write_folder(path, cfg: ModelConfig, weights: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg.to_dict()))
    save_file({k: v.contiguous() for k, v in weights.items()}, path / "diffusion_pytorch_model.safetensors")


def plain_forward(w: dict, cfg: ModelConfig, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """float64 URSA forward written from DESIGN §3 alone: complex-number RoPE, a loop over heads."""
    w = {k: v.double() for k, v in w.items()}
    d, hq, hkv, eps = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rms_norm_eps

    def norm(x, g):
        return g * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)

    half = d // 2
    axis = [j % 3 if j < 3 * (d // 8) else 1 + (j - 3 * (d // 8)) % 2 for j in range(half)]
    angle = torch.stack([pos[:, axis[j]].double() * cfg.rope_theta ** (-2 * j / d) for j in range(half)], -1)
    rot = torch.polar(torch.ones_like(angle), angle)  # (L, D/2)

    def rope(x):  # pairs (j, j + D/2) as complex numbers
        z = torch.complex(x[..., :half], x[..., half:]) * rot[:, None, :]
        return torch.cat([z.real, z.imag], -1)

    x = w["model.embed_tokens.weight"][ids]
    B, L, _ = x.shape
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        a = norm(x, w[p + "input_layernorm.weight"])
        q = (a @ w[p + "self_attn.q_proj.weight"].T).view(B, L, hq, d)
        k = (a @ w[p + "self_attn.k_proj.weight"].T).view(B, L, hkv, d)
        v = (a @ w[p + "self_attn.v_proj.weight"].T).view(B, L, hkv, d)
        q = rope(norm(q, w[p + "self_attn.q_norm.weight"]))
        k = rope(norm(k, w[p + "self_attn.k_norm.weight"]))
        heads = []
        for h in range(hq):
            g = h // (hq // hkv)
            s = torch.einsum("bid,bjd->bij", q[:, :, h], k[:, :, g]) / math.sqrt(d)
            heads.append(torch.einsum("bij,bjd->bid", s.softmax(-1), v[:, :, g]))
        x = x + torch.cat(heads, -1) @ w[p + "self_attn.o_proj.weight"].T
        m = norm(x, w[p + "post_attention_layernorm.weight"])
        x = x + (F.silu(m @ w[p + "mlp.gate_proj.weight"].T) * (m @ w[p + "mlp.up_proj.weight"].T)) \
            @ w[p + "mlp.down_proj.weight"].T
    return norm(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    weights = random_checkpoint(TINY)
    folder = tmp_path_factory.mktemp("ckpt") / "transformer"
    write_folder(folder, TINY, weights)
    return folder, weights


def _inputs(cfg=TINY, B=2, P=6, shape=(2, 3, 4), seed=1):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, cfg.lm_vocab_size, (B, P), generator=g)
    latents = torch.randint(0, cfg.lm_head_size, (B, *shape), generator=g)
    return sequence_ids(prompt, latents, cfg), latent_positions(P, shape)


def test_public_names_exported():
    assert ue.ModelConfig is ModelConfig and ue.URSATransformer is URSATransformer
    assert ue.latent_positions is latent_positions


def test_loaded_checkpoint_matches_plain_implementation_fp32(tiny_folder):
    folder, weights = tiny_folder
    model = URSATransformer.from_pretrained(folder, dtype=torch.float32)
    ids, pos = _inputs()
    ref = plain_forward(weights, TINY, ids, pos)
    for backend in ("math", "sdpa"):
        assert rel_err(model(ids, pos, attn_backend=backend), ref) <= REL_FP32


def test_latent_logits_are_the_shifted_slice_of_full_logits(tiny_folder):
    model = URSATransformer.from_pretrained(tiny_folder[0], dtype=torch.float32)
    ids, pos = _inputs()
    full = model(ids, pos)
    n = 2 * 3 * 4
    lat = model(ids, pos, latent_tokens=n)
    assert lat.shape == (2, n, TINY.lm_head_size)
    torch.testing.assert_close(lat, full[:, -n - 1 : -1], rtol=1e-6, atol=1e-6)


def test_matches_hf_qwen3_with_full_mask_on_text_positions(tiny_folder):
    transformers = pytest.importorskip("transformers")
    folder, weights = tiny_folder
    cfg = TINY
    hf_cfg = transformers.Qwen3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, max_position_embeddings=4096,
        tie_word_embeddings=False, attention_bias=False, use_sliding_window=False)
    hf_cfg._attn_implementation = "eager"
    hf = transformers.Qwen3Model(hf_cfg).eval()
    hf.load_state_dict({k[len("model."):]: v for k, v in weights.items() if k.startswith("model.")}, strict=True)
    B, L = 2, 13
    ids = torch.randint(0, cfg.lm_vocab_size, (B, L), generator=torch.Generator().manual_seed(5))
    full_mask = torch.zeros(B, 1, L, L)  # additive: every token attends every token
    with torch.no_grad():
        hidden = hf(input_ids=ids, attention_mask=full_mask).last_hidden_state
    ref = hidden.double() @ weights["lm_head.weight"].double().T
    model = URSATransformer.from_pretrained(folder, dtype=torch.float32)
    text_pos = torch.arange(L)[:, None].expand(-1, 3)  # (p, p, p): 3D RoPE reduces to 1D
    assert rel_err(model(ids, text_pos), ref) <= REL_FP32


def test_attention_is_bidirectional(tiny_folder):
    model = URSATransformer.from_pretrained(tiny_folder[0], dtype=torch.float32)
    ids, pos = _inputs(B=1)
    ids2 = ids.clone()
    ids2[0, -1] = (ids2[0, -1] + 1 - TINY.lm_vocab_size) % TINY.lm_head_size + TINY.lm_vocab_size
    assert not torch.allclose(model(ids, pos)[0, 0], model(ids2, pos)[0, 0])  # the first text token sees the last


def test_latent_positions_follow_design():
    P, shape = 4, (2, 3, 5)
    pos = latent_positions(P, shape)
    assert pos.shape == (P + 1 + 30, 3) and pos.dtype == torch.int64
    assert pos[:P].tolist() == [[p, p, p] for p in range(P)]
    assert pos[P].tolist() == [P, P, P]
    lat = pos[P + 1 :].view(2, 3, 5, 3)
    for f, y, x in [(0, 0, 0), (1, 2, 4), (0, 1, 3), (1, 0, 2)]:
        assert lat[f, y, x].tolist() == [P + 1 + f, y, x]
    assert torch.equal(latent_positions(P, (3, 5)), latent_positions(P, (1, 3, 5)))


def test_video_sizes_match_design():
    assert latent_positions(320, (13, 40, 64)).shape[0] == 33601


@pytest.mark.parametrize("name,dims", [("ursa-0.6b", (1024, 3072, 16, 28)), ("ursa-1.7b", (2048, 6144, 16, 28)),
                                       ("ursa-4b", (2560, 9728, 32, 36))])
def test_presets_follow_design(name, dims):
    cfg = ModelConfig.preset(name)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_hidden_layers) == dims
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.rope_theta, cfg.rms_norm_eps) == (128, 8, 1e6, 1e-6)
    assert (cfg.vocab_size, cfg.lm_vocab_size, cfg.lm_head_size, cfg.bov_token_id) == (215669, 151669, 64000, 151652)


def test_step_flops_match_design_floor():
    flops = ModelConfig.preset("ursa-1.7b").forward_flops(33601, batch=2, latent_tokens=33280)
    assert abs(flops / 1e12 - 725) < 5  # DESIGN §6: ≈ 725 TFLOP per CFG step


def test_random_model_has_the_config_parameter_count():
    model = URSATransformer(TINY)
    assert sum(p.numel() for p in model.parameters()) == TINY.num_params()
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_fp32(tiny_folder, dtype):
    folder, _ = tiny_folder
    ids, pos = _inputs()
    ref = URSATransformer.from_pretrained(folder, dtype=torch.float32)(ids, pos)
    out = URSATransformer.from_pretrained(folder, dtype=dtype)(ids, pos)
    assert out.dtype == dtype
    assert rel_err(out, ref) < 0.05


def test_per_sample_positions_equal_shared_positions(tiny_folder):
    model = URSATransformer.from_pretrained(tiny_folder[0], dtype=torch.float32)
    ids, pos = _inputs()
    torch.testing.assert_close(model(ids, pos[None].expand(2, -1, -1)), model(ids, pos))


def test_batch_rows_are_independent(tiny_folder):
    model = URSATransformer.from_pretrained(tiny_folder[0], dtype=torch.float32)
    ids, pos = _inputs(B=3)
    torch.testing.assert_close(model(ids, pos)[1:2], model(ids[1:2], pos), rtol=1e-5, atol=1e-5)


def test_rejects_bad_arguments():
    model = URSATransformer(TINY)
    ids, pos = _inputs()
    with pytest.raises(ValueError, match="positions"):
        model(ids, pos[:-1])
    with pytest.raises(ValueError, match="positions"):
        model(ids)
    with pytest.raises(ValueError, match="input_ids"):
        model(ids[0], pos)
    with pytest.raises(ValueError, match="latent_tokens"):
        model(ids, pos, latent_tokens=ids.shape[1])
    with pytest.raises(ValueError, match="attention backend"):
        model(ids, pos, attn_backend="nope")
    with pytest.raises(RuntimeError, match="flash"):
        model(ids, pos, attn_backend="flash")  # no CUDA here / not installed: says why
    with pytest.raises(ValueError, match="preset"):
        ModelConfig.preset("ursa-9b")
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelConfig.preset("tiny", num_key_value_heads=3)
    with pytest.raises(ValueError, match="latents_shape"):
        latent_positions(3, (2, 0, 4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["sdpa", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "flash"])
def test_attention_backends_match_math_on_gpu(backend):
    from ursa_engine.attention import attention, flash_unavailable, math_attention

    if backend == "flash" and flash_unavailable(torch.device("cuda"), torch.bfloat16, 128):
        pytest.skip("flash-attn not installed")
    g = torch.Generator(device="cuda").manual_seed(0)
    L = 333  # not a multiple of 128: the cuDNN trap of DESIGN §4
    q = torch.randn(2, L, 16, 128, device="cuda", generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(2, L, 8, 128, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    ref = math_attention(q.float(), k.float(), v.float())
    own = (math_attention(q, k, v).float() - ref).abs().max().item()
    try:
        out = attention(q, k, v, backend=backend)
    except (RuntimeError, ValueError) as err:  # a forced kernel that cannot run (or, cuDNN, be right) here
        pytest.skip(f"{backend}: {err}")
    assert (out.float() - ref).abs().max().item() <= 2 * own + 1e-2


def test_flash_import_is_tried_once(monkeypatch):
    """A missing flash-attn costs one failed import per process, not one per attention call."""
    import ursa_engine.attention as attn

    tried = []

    def no_flash(name):
        tried.append(name)
        raise ImportError(name)

    getattr(attn._flash_func, "cache_clear", lambda: None)()
    monkeypatch.setattr(attn.importlib, "import_module", no_flash)
    try:
        for _ in range(3):
            assert attn._flash_func()[0] is None
        assert tried == ["flash_attn_interface", "flash_attn"]
    finally:
        getattr(attn._flash_func, "cache_clear", lambda: None)()


def test_forced_cudnn_sdpa_refuses_query_lengths_it_gets_wrong(monkeypatch):
    """cuDNN < 9.15.1 with L % 128 != 0 is silently wrong (DESIGN §4): a forced "sdpa-cudnn" says so."""
    from ursa_engine.attention import resolve_attention

    cuda = torch.device("cuda")  # resolve only: nothing runs on the device
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 90100)
    with pytest.raises(ValueError, match=r"sdpa-cudnn.*cuDNN 90100.*L=333"):
        resolve_attention("sdpa-cudnn", cuda, torch.bfloat16, 128, seq_len=333)
    assert resolve_attention("sdpa-cudnn", cuda, torch.bfloat16, 128, seq_len=256) == "sdpa-cudnn"
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91501)
    assert resolve_attention("sdpa-cudnn", cuda, torch.bfloat16, 128, seq_len=333) == "sdpa-cudnn"


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_sequence_chunked_mlp_and_qkv_give_the_unchunked_logits(dtype, tol):
    """Long sequences run the MLP (and a q / k / v projection >= 3 hidden states wide) in token
    ranges: the same math per token, so the logits equal the unchunked model's."""
    cfg = ModelConfig.preset("tiny", num_attention_heads=8)  # q / k / v: (8 + 4) · 16 = 3 x hidden
    torch.manual_seed(0)
    model = URSATransformer(cfg, dtype=dtype, init_std=0.2)
    ids, pos = _inputs(cfg, B=2, P=5, shape=(3, 4, 5))
    model.activation_budget = None
    ref = model(ids, pos)
    assert model.activation_chunks(2, ids.shape[1], 4) == {"qkv_chunks": None, "mlp_chunks": None}
    for budget in (2 * 3 * 96 * 8 * 7, 1):  # 7 (fp64) or 14 (fp32) tokens a range, ragged tail; then one
        model.activation_budget = budget
        chunks = model.activation_chunks(2, ids.shape[1], torch.empty((), dtype=dtype).element_size())
        assert len(chunks["mlp_chunks"]) > 1 and len(chunks["qkv_chunks"]) > 1
        assert rel_err(model(ids, pos), ref) <= tol


def test_narrow_qkv_is_not_chunked_and_training_never_chunks():
    model = URSATransformer(TINY, activation_budget=1)  # q / k / v: (4 + 4) · 16 = 2 x hidden
    chunks = model.activation_chunks(2, 100, 4)
    assert chunks["qkv_chunks"] is None and len(chunks["mlp_chunks"]) == 100
    model.requires_grad_(True)
    assert model.activation_chunks(2, 100, 4) == {"qkv_chunks": None, "mlp_chunks": None}
    with torch.no_grad():
        assert len(model.activation_chunks(2, 100, 4)["mlp_chunks"]) == 100
