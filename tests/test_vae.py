"""The image / video tokenizers (ursa_engine.vae): the authors' semantics on tiny random models.

What is checked against independent formulations: the Haar patcher (grouped strided convs, as
the authors write it), FSQ (the DESIGN §2.1 code table and the authors' tanh bound), IBQ (brute
force largest inner product), the temporal tiling (which latent frames a tile decodes), causality
and attention span, chunked == plain, the uint8 conventions, loading errors and bad inputs.
"""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from roots import TINY_COSMOS, TINY_IBQ, tiny_tokenizer

import ursa_engine as ue
from ursa_engine.vae import CosmosFSQTokenizer, IBQTokenizer, TokenizerError, load_tokenizer, to_uint8
from ursa_engine.vae.quantizers import FSQuantizer, VQuantizer
from ursa_engine.vae.wavelets import dwt3d, idwt3d, patchify, unpatchify


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():  # the tokenizers' own calls are no_grad; direct module calls here too
        yield


def _close(a, b, rel=1e-6):
    """Equal up to float rounding: max |a − b| ≤ rel · max(1, max |a|)."""
    scale = max(1.0, float(a.abs().max()))
    return float((a - b).abs().max()) <= rel * scale


# ---------------------------------------------------------------------------- wavelets
def _dwt_by_convs(x):
    """The authors' formulation: reflect pad, then strided grouped convs with taps
    (a, a) / (a, −a) along t, h, w, bands ordered t-major, scaled by 1/(2√2)."""
    g, a = x.shape[1], 1 / math.sqrt(2)
    low, high = torch.tensor([a, a], dtype=x.dtype), torch.tensor([a, -a], dtype=x.dtype)
    x = F.pad(x, (0, 1, 0, 1, 0, 1), mode="reflect")
    out = []
    for wt in (low, high):
        xt = F.conv3d(x, wt.view(1, 1, 2, 1, 1).repeat(g, 1, 1, 1, 1), stride=(2, 1, 1), groups=g)
        for wh in (low, high):
            xh = F.conv3d(xt, wh.view(1, 1, 1, 2, 1).repeat(g, 1, 1, 1, 1), stride=(1, 2, 1), groups=g)
            for ww in (low, high):
                out.append(F.conv3d(xh, ww.view(1, 1, 1, 1, 2).repeat(g, 1, 1, 1, 1), stride=(1, 1, 2), groups=g))
    return torch.cat(out, 1) / (2 * math.sqrt(2))


def test_dwt_matches_the_strided_grouped_conv_formulation_and_idwt_inverts_it():
    x = torch.randn(2, 3, 4, 6, 8, dtype=torch.float64)
    y = dwt3d(x)
    assert y.shape == (2, 24, 2, 3, 4)
    torch.testing.assert_close(y, _dwt_by_convs(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(idwt3d(y), x, rtol=0, atol=1e-12)
    assert torch.allclose(y[:, :3], x.unfold(2, 2, 2).unfold(3, 2, 2).unfold(4, 2, 2).mean((-3, -2, -1)))


def test_patchify_repeats_frame_zero_and_unpatchify_drops_the_copies():
    x = torch.randn(1, 3, 9, 8, 8, dtype=torch.float64)  # 1 + 4·2 frames -> 3 latent-rate frames
    y = patchify(x, 2)
    assert y.shape == (1, 3 * 64, 3, 2, 2)
    torch.testing.assert_close(unpatchify(y, 2), x, rtol=0, atol=1e-12)
    first = torch.cat([x[:, :, :1]] * 4 + [x[:, :, 1:]], 2)
    torch.testing.assert_close(y, dwt3d(dwt3d(first)), rtol=0, atol=0)


def test_dwt_rejects_odd_sizes():
    with pytest.raises(ValueError, match="H=5"):
        dwt3d(torch.zeros(1, 1, 2, 5, 4))


# ---------------------------------------------------------------------------- quantizers
def test_fsq_dequantize_is_the_design_codebook_and_quantize_inverts_it():
    q = FSQuantizer((8, 5, 4))
    ids = torch.arange(q.size)
    coords = q.dequantize(ids[None], torch.float32)[0].T  # (K, m)
    torch.testing.assert_close(coords, ue.Codebook.fsq((8, 5, 4)).emb.float(), rtol=0, atol=0)
    # latents whose bounded value lands on a level: pre-image of the authors' tanh bound
    lv = torch.tensor([8.0, 5.0, 4.0])
    half_l, offset = (lv - 1) * 1.001 / 2, (lv % 2 == 0).float() * 0.5
    digits = coords * (lv // 2)  # q − L//2
    z = torch.atanh((digits + offset) / half_l) - torch.atanh(offset / half_l)
    assert torch.equal(q.quantize(z.T[None]), ids[None])


def test_fsq_quantize_rounds_half_to_even_like_torch_round():
    q = FSQuantizer((5,))
    z = torch.linspace(-3, 3, 601)
    half_l = 4 * 1.001 / 2
    expect = (torch.tanh(z) * half_l).round() + 2
    assert torch.equal(q.quantize(z[None, None])[0], expect.long())


def test_ibq_quantize_is_the_largest_inner_product_in_row_chunks():
    torch.manual_seed(0)
    q = VQuantizer(300, 5)
    z = torch.randn(1, 5, 40, 70)  # 2,800 rows: several chunks of 1,024
    ids = q.quantize(z)
    brute = (z[0].permute(1, 2, 0) @ q.embedding.weight.T).argmax(-1)
    assert torch.equal(ids[0], brute)
    nearest = torch.cdist(z[0].permute(1, 2, 0).reshape(-1, 5), q.embedding.weight).argmin(-1)
    assert not torch.equal(ids[0].flatten(), nearest)  # not the nearest code: the inner product
    torch.testing.assert_close(q.dequantize(ids, torch.float32)[0], q.embedding.weight[ids[0]].permute(2, 0, 1))


# ---------------------------------------------------------------------------- shapes, strides, tiles
@pytest.fixture(scope="module")
def cosmos():
    return tiny_tokenizer("cosmos3d")


@pytest.fixture(scope="module")
def ibq():
    return tiny_tokenizer("ibq")


def test_cosmos_shapes_and_strides(cosmos):
    assert (cosmos.temporal_stride, cosmos.spatial_stride, cosmos.codebook_size) == (4, 8, 64)
    assert cosmos.latent_shape(9, 32, 48) == (3, 4, 6) and cosmos.latent_shape(1, 32, 48) == (1, 4, 6)
    x = torch.rand(2, 3, 9, 32, 48) * 2 - 1
    ids = cosmos.encode(x)
    assert ids.shape == (2, 3, 4, 6) and ids.dtype == torch.long and 0 <= ids.min() and ids.max() < 64
    assert cosmos.decode(ids).shape == (2, 3, 9, 32, 48)
    image = cosmos.encode(x[:, :, 0])  # (B, 3, H, W): one frame
    assert image.shape == (2, 1, 4, 6)
    assert cosmos.decode(image[:, 0]).shape == (2, 3, 1, 32, 48)


def test_ibq_shapes_and_strides(ibq):
    assert (ibq.temporal_stride, ibq.spatial_stride, ibq.codebook_size) == (1, 4, 100)
    x = torch.rand(3, 3, 32, 48) * 2 - 1
    ids = ibq.encode(x)
    assert ids.shape == (3, 1, 8, 12)
    assert ibq.decode(ids).shape == (3, 3, 1, 32, 48)
    frames = ibq.encode(torch.rand(1, 3, 2, 32, 48))  # frames are independent images
    assert frames.shape == (1, 2, 8, 12)


def test_cosmos_tiles_follow_the_authors_tiling(cosmos):
    # sample_frames = 9: tiles of 3 latent frames; 7 latent frames = 2 whole tiles + 1 left out
    assert cosmos.latent_frames == 3
    assert [cosmos.num_frames(T) for T in (1, 2, 3, 4, 5, 6, 7)] == [1, 5, 9, 9, 9, 17, 17]
    ids = torch.randint(0, 64, (1, 7, 4, 6), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="latent frames 6..6"):
        out = cosmos.decode(ids)
    tile0, tile1 = cosmos.decode(ids[:, :3]), cosmos.decode(ids[:, 3:6])
    assert out.shape[2] == 17
    assert _close(out[:, :, :9], tile0) and _close(out[:, :, 9:], tile1[:, :, 1:])  # first frame of tile 2 dropped
    # encoding: clips of sample_frames overlapping by one frame, latents concatenated whole
    x = torch.rand(1, 3, 25, 32, 48) * 2 - 1
    ids = cosmos.encode(x)
    assert ids.shape == (1, 9, 4, 6) and cosmos.encoded_frames(25) == 9 and cosmos.latent_shape(25, 32, 48)[0] == 7
    assert [cosmos.encoded_frames(f) for f in (1, 5, 9, 13, 17)] == [1, 2, 3, 3, 6]
    assert torch.equal(ids[:, 3:6], cosmos.encode(x[:, :, 8:17]))
    assert torch.equal(ids[:, 6:], cosmos.encode(x[:, :, 16:]))


def test_cosmos_tiles_are_independent_and_attention_spans_a_tile(cosmos):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (1, 6, 4, 6), generator=g)
    base = cosmos.decode(ids)
    later = ids.clone()
    later[:, 5] = (later[:, 5] + 1) % 64  # last latent frame of tile 2
    out = cosmos.decode(later)
    assert torch.equal(out[:, :, :9], base[:, :, :9])  # tile 1 untouched
    # inside tile 2 the change reaches its first decoded frames: temporal attention is not causal
    assert (out[:, :, 9] - base[:, :, 9]).abs().max() > 1e-4
    # while in a causal-conv-only path nothing before the changed frame could move: check the
    # decoder's temporal convs alone are causal
    conv = cosmos.decoder.conv_in[1]
    z = torch.randn(1, conv.in_channels, 5, 2, 2)
    z2 = z.clone()
    z2[:, :, 3] += 1
    assert torch.equal(conv(z)[:, :, :3], conv(z2)[:, :, :3])


@pytest.mark.parametrize("family", ["cosmos3d", "ibq"])
def test_chunked_decode_and_encode_equal_the_plain_computation(family, cosmos, ibq):
    """Chunking changes no arithmetic: in fp64 the chunked decode equals the plain one to 1e-12.
    In fp32 the conv / GEMM libraries pick kernels by batch size (conv_in alone already differs
    by ~5e-7 between 1 and 4 frames), so there the bound is float rounding, 1e-5 relative."""
    tok = cosmos if family == "cosmos3d" else ibq
    wide = type(tok)(tok.config).double()
    wide.load_state_dict(tok.state_dict())
    g = torch.Generator().manual_seed(2)
    T = 3 if family == "cosmos3d" else 2
    ids = torch.randint(0, tok.codebook_size, (2, T, *tok.latent_shape(9 if T == 3 else 1, 32, 48)[1:]), generator=g)
    exact, plain = wide.decode(ids, chunk_frames=0), tok.decode(ids, chunk_frames=0)
    for chunk in (1, 2):
        assert _close(exact, wide.decode(ids, chunk_frames=chunk), rel=1e-12)
        assert _close(plain, tok.decode(ids, chunk_frames=chunk), rel=1e-5)
    assert _close(exact, wide.decode(ids, memory_budget=1), rel=1e-12)  # smallest budget: a frame per chunk
    assert tok.chunk_frames(4, 6, memory_budget=1) == 1 and tok.chunk_frames(4, 6, memory_budget=1 << 40) > 100
    x = exact.clamp(-1, 1)
    assert torch.equal(wide.encode(x, chunk_frames=0), wide.encode(x, chunk_frames=1))


def test_decode_frames_truncates_and_encode_frames_scales_like_the_authors(cosmos):
    x = torch.tensor([-1.5, -1.0, -0.0039, 0.0, 0.0039, 0.5, 0.99, 1.0, 2.0]).view(1, 1, 1, 1, 9).expand(1, 3, 1, 1, 9)
    got = to_uint8(x)[0, 0, 0, :, 0]
    assert got.tolist() == [0, 0, 127, 127, 127, 191, 253, 255, 255]  # 127.997 -> 127: truncated, not rounded
    frames = np.random.default_rng(0).integers(0, 256, (9, 32, 48, 3), dtype=np.uint8)
    expect = cosmos.encode((torch.from_numpy(frames).float().sub(127.5).div(127.5)).permute(3, 0, 1, 2)[None])
    assert torch.equal(cosmos.encode_frames(frames), expect)
    assert cosmos.encode_frames(frames[0]).shape == (1, 1, 4, 6)
    out = cosmos.decode_frames(expect)
    assert out.shape == (1, 9, 32, 48, 3) and out.dtype == np.uint8
    assert np.array_equal(out, to_uint8(cosmos.decode(expect)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_decode_runs_and_stays_near_fp32(cosmos, dtype):
    tok = CosmosFSQTokenizer(TINY_COSMOS)
    tok.load_state_dict(cosmos.state_dict())
    tok = tok.to(dtype)
    ids = torch.randint(0, 64, (1, 3, 4, 6), generator=torch.Generator().manual_seed(3))
    ref = cosmos.decode(ids)
    out = tok.decode(ids)
    assert out.dtype == dtype
    eps = torch.finfo(dtype).eps
    assert float((out.float() - ref).abs().max()) <= 64 * eps * max(1.0, float(ref.abs().max()))
    assert tok.encode(ref.clamp(-1, 1).to(dtype)).shape == ids.shape


# ---------------------------------------------------------------------------- files
@pytest.mark.parametrize("family", ["cosmos3d", "ibq"])
def test_save_and_load_in_the_published_layout(tmp_path, family, cosmos, ibq):
    tok = cosmos if family == "cosmos3d" else ibq
    tok.save_pretrained(tmp_path / "vae")
    cfg = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert cfg["_class_name"] == ("AutoencoderVQCosmos3D" if family == "cosmos3d" else "AutoencoderVQ")
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_tokenizer(tmp_path / "vae")
    assert type(loaded) is type(tok)
    ids = torch.randint(0, tok.codebook_size, (1, 1, 8, 12) if family == "ibq" else (1, 3, 4, 6))
    assert _close(tok.decode(ids), loaded.decode(ids))
    half = load_tokenizer(tmp_path / "vae", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


def test_published_names_are_the_authors(cosmos, ibq):
    names = set(cosmos.state_dict())
    for name in ("encoder.conv_in.0.weight", "encoder.conv_in.1.weight",
                 "encoder.down_blocks.0.downsamplers.0.conv1.weight",
                 "encoder.down_blocks.0.downsamplers.0.conv3.weight",
                 "encoder.mid_block.attentions.0.0.to_q.weight",
                 "encoder.mid_block.attentions.0.1.to_out.0.bias", "decoder.up_blocks.0.upsamplers.0.conv2.weight",
                 "decoder.up_blocks.0.resnets.0.conv1.1.weight", "quant_conv.weight", "post_quant_conv.bias"):
        assert name in names, name
    assert cosmos.state_dict()["quant_conv.weight"].shape == (3, 4, 1, 1, 1)
    names = set(ibq.state_dict())
    for name in ("quantizer.embedding.weight", "encoder.down_blocks.0.downsamplers.0.conv.weight",
                 "decoder.up_blocks.0.upsamplers.0.conv.weight", "decoder.mid_block.attentions.0.to_k.weight",
                 "encoder.conv_norm_out.weight"):
        assert name in names, name
    assert ibq.decoder.up_blocks[0].resnets.__len__() == 2  # layers_per_block + 1


def test_ibq_optional_attention_blocks_and_decoder_dtype():
    tok = IBQTokenizer({**TINY_IBQ, "attn_down_block": True, "attn_up_block": True, "decoder_dtype": "bfloat16"})
    assert len(tok.encoder.down_blocks[-1].attentions) == 1 and len(tok.decoder.up_blocks[0].attentions) == 2
    assert tok.decoder.conv_in.weight.dtype == torch.bfloat16 and tok.encoder.conv_in.weight.dtype == torch.float32
    tok = tok.to(torch.float32)
    assert tok.decoder.conv_in.weight.dtype == torch.bfloat16  # the config's decoder dtype wins, as the authors'
    assert tok.decode(torch.zeros(1, 1, 8, 12, dtype=torch.long)).dtype == torch.bfloat16


def test_load_errors_list_every_bad_weight(tmp_path, cosmos):
    from safetensors.torch import load_file, save_file

    cosmos.save_pretrained(tmp_path / "vae")
    path = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    state.pop("decoder.conv_out.1.bias")
    state["encoder.extra.weight"] = torch.zeros(1)
    state["quant_conv.weight"] = torch.zeros(3, 4, 1, 1, 2)
    save_file(state, path)
    with pytest.raises(TokenizerError) as err:
        load_tokenizer(tmp_path / "vae")
    msg = str(err.value)
    assert "decoder.conv_out.1.bias" in msg and "encoder.extra.weight" in msg and "quant_conv.weight" in msg
    assert "AutoencoderVQCosmos3D" in msg


def test_load_errors_for_folders_and_configs(tmp_path):
    with pytest.raises(TokenizerError, match="not a directory"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "vae").mkdir()
    with pytest.raises(TokenizerError, match="no config.json"):
        load_tokenizer(tmp_path / "vae")
    (tmp_path / "vae" / "config.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="not valid JSON"):
        load_tokenizer(tmp_path / "vae")
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLLTXVideo"}))
    with pytest.raises(TokenizerError, match="AutoencoderKLLTXVideo.*known: AutoencoderVQ, AutoencoderVQCosmos3D"):
        load_tokenizer(tmp_path / "vae")
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderVQ", **TINY_IBQ,
                                                               "spatial_stride": 8}))
    with pytest.raises(TokenizerError, match="spatial_stride=8"):
        load_tokenizer(tmp_path / "vae")
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderVQ", **TINY_IBQ}))
    with pytest.raises(TokenizerError, match="safetensors"):
        load_tokenizer(tmp_path / "vae")


# ---------------------------------------------------------------------------- bad input
def test_bad_inputs_name_the_argument(cosmos, ibq):
    with pytest.raises(ValueError, match="pixels: expected 3 channels"):
        cosmos.encode(torch.zeros(1, 4, 9, 32, 48))
    with pytest.raises(ValueError, match="num_frames: .*1 \\+ 4k.*got 8"):
        cosmos.encode(torch.zeros(1, 3, 8, 32, 48))
    with pytest.raises(ValueError, match="height: must be a multiple of the spatial stride 8, got 30"):
        cosmos.encode(torch.zeros(1, 3, 9, 30, 48))
    with pytest.raises(ValueError, match="width: must be a multiple of the spatial stride 4, got 50"):
        ibq.encode(torch.zeros(1, 3, 32, 50))
    with pytest.raises(ValueError, match="pixels: contains NaN"):
        cosmos.encode(torch.full((1, 3, 1, 32, 48), float("nan")))
    with pytest.raises(TypeError, match="pixels: expected a float tensor"):
        cosmos.encode(torch.zeros(1, 3, 9, 32, 48, dtype=torch.uint8))
    with pytest.raises(ValueError, match="ids: codes must lie in \\[0, 64\\), got \\[0, 64\\]"):
        cosmos.decode(torch.tensor([[[[0, 64]]]]))
    with pytest.raises(ValueError, match="ids: codes must lie in \\[0, 100\\)"):
        ibq.decode(torch.full((1, 1, 2, 2), -1))
    with pytest.raises(TypeError, match="ids: expected integer codes"):
        cosmos.decode(torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="ids: expected \\(B, T, h, w\\)"):
        cosmos.decode(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="frames: expected uint8"):
        cosmos.encode_frames(np.zeros((9, 32, 48, 3), np.float32))
    with pytest.raises(ValueError, match="frames: expected"):
        cosmos.encode_frames(np.zeros((9, 32, 48, 4), np.uint8))
    with pytest.raises(ValueError, match="height: must be a multiple"):
        cosmos.latent_shape(9, 33, 48)


def test_fsq_config_must_agree_with_its_levels():
    with pytest.raises(ValueError, match="num_vq_embeddings=64000"):
        CosmosFSQTokenizer({**TINY_COSMOS, "num_vq_embeddings": 64000})


def test_authors_default_config_builds_the_published_geometry():
    with torch.device("meta"):
        tok = CosmosFSQTokenizer()
    assert tok.codebook_size == 64000 and tok.latent_frames == 5 and tok.num_frames(13) == 33
    n = sum(p.numel() for p in tok.parameters())
    assert 50e6 < n < 200e6  # the Cosmos-style tokenizer's size class
    assert tok.decoder.conv_out[1].out_channels == 192 and tok.decoder.conv_norm_out.num_channels == 256
    with torch.device("meta"):
        assert CosmosFSQTokenizer({"sample_frames": 49}).num_frames(13) == 49
        ibq = IBQTokenizer({"block_out_channels": [128, 128, 256, 256, 512], "num_vq_embeddings": 131072,
                            "vq_embed_dim": 256})
    assert ibq.latent_shape(1, 1024, 1024) == (1, 64, 64) and ibq.codebook_size == 131072


def test_the_bundled_digits_tokenizer_is_a_family_too():
    from ursa_engine.demo import DEFAULT_ROOT
    from ursa_engine.digits import PatchTokenizer
    from ursa_engine.vae import DigitsPatchTokenizer

    tok = load_tokenizer(DEFAULT_ROOT / "vae")
    assert isinstance(tok, DigitsPatchTokenizer) and (tok.codebook_size, tok.spatial_stride) == (256, 2)
    ref = PatchTokenizer.from_pretrained(DEFAULT_ROOT / "vae")
    ids = torch.randint(0, 256, (2, 3, 8, 16), generator=torch.Generator().manual_seed(4))
    frames = tok.decode_frames(ids)
    assert frames.shape == (2, 3, 16, 32, 3) and (frames[..., 0] == frames[..., 2]).all()
    assert np.abs(frames[..., 0] / 255 - ref.decode(ids).numpy()).max() <= 1 / 255
    assert torch.equal(tok.encode_frames(frames), ref.encode(torch.from_numpy(frames[..., 0]).float() / 255))
