"""Transformer overlays (``transformer_weights=`` / ``--transformer-weights``) and legacy ``.bin`` / ``.pt`` /
``.pth`` weights (issue 19 item 2): round trips through every format and wrapper prefix (DDP ``module.``,
``torch.compile``'s ``_orig_mod.``, a merged ``PeftModel``'s ``base_model.model.`` as the peft library
writes it), the model's fused names, a ``.bin`` transformer folder; refused pickles run nothing; every
missing, unexpected and mis-shaped key in one error."""

import json
import pathlib

import pytest
import torch
from roots import tiny_model_config, write_tiny_root
from safetensors.torch import save_file

import ursa_engine as ue
from ursa_engine.checkpoint import CheckpointError, checkpoint_shapes, read_weights, to_checkpoint_state_dict
from ursa_engine.cli import main
from ursa_engine.model import latent_positions, sequence_ids

K = 64  # the tiny Cosmos root's codebook
CFG = tiny_model_config(K)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_tiny_root(tmp_path_factory.mktemp("overlay") / "root", with_vae=False, seed=0)


@pytest.fixture(scope="module")
def tuned():
    """A different transformer of the root's config: what a fine-tune produces."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        return ue.URSATransformer(CFG, init_std=0.2)


def _published(model) -> dict[str, torch.Tensor]:
    """The state dict under the published (Qwen3) names, as the authors' transformer writes it."""
    return {k: v.clone() for k, v in to_checkpoint_state_dict(model.state_dict(), model.config).items()}


def _logits(model):
    g = torch.Generator().manual_seed(3)
    ids = sequence_ids(torch.randint(0, 500, (2, 4), generator=g), torch.randint(0, K, (2, 2, 3), generator=g),
                       model.config)
    return model(ids, latent_positions(4, (2, 3)))


def _assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    torch.testing.assert_close(_logits(a), _logits(b), rtol=0, atol=0)


def _write(state, path):
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("fname, transform", [
    ("tuned.safetensors", lambda m: _published(m)),
    ("diffusion_pytorch_model.bin", lambda m: _published(m)),  # UDM-GRPO's --tdir file
    ("ddp.pt", lambda m: {"module." + k: v for k, v in _published(m).items()}),
    ("compiled.pth", lambda m: {"_orig_mod." + k: v for k, v in _published(m).items()}),
    ("ddp_compiled.bin", lambda m: {"module._orig_mod." + k: v for k, v in _published(m).items()}),
    ("fused_names.pt", lambda m: dict(m.state_dict())),  # an URSATransformer's own state_dict()
    ("wrapped.pt", lambda m: {"state_dict": _published(m), "epoch": 3}),
])
def test_overlay_round_trips(root, tuned, tmp_path, fname, transform):
    path = _write(transform(tuned), tmp_path / fname)
    engine = ue.Engine.from_pretrained(root, device="cpu", transformer_weights=path)
    _assert_same_model(engine.model, tuned)
    base = ue.Engine.from_pretrained(root, device="cpu").model
    assert not torch.equal(base.lm_head.weight, engine.model.lm_head.weight)  # the overlay did replace weights


def test_overlay_dtype_follows_the_engine(root, tuned, tmp_path):
    path = _write({k: v.bfloat16() for k, v in _published(tuned).items()}, tmp_path / "bf16.bin")
    assert ue.Engine.from_pretrained(root, device="cpu", transformer_weights=path).dtype == torch.bfloat16
    engine = ue.Engine.from_pretrained(root, device="cpu", dtype=torch.float32, transformer_weights=path)
    assert engine.dtype == torch.float32
    assert torch.equal(engine.model.lm_head.weight, tuned.lm_head.weight.bfloat16().float())


def test_overlay_folder_of_bin_shards(root, tuned, tmp_path):
    state, folder = _published(tuned), tmp_path / "shards"
    folder.mkdir()
    names = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for fname, keys in halves.items():
        torch.save({k: state[k] for k in keys}, folder / fname)
    weight_map = {k: f for f, keys in halves.items() for k in keys}
    (folder / "model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _assert_same_model(ue.Engine.from_pretrained(root, device="cpu", transformer_weights=folder).model, tuned)


class _PeftStyle(torch.nn.Module):
    """The authors' module names (Qwen3: separate q / k / v and gate / up) and the same shapes."""

    def __init__(self, cfg):
        super().__init__()
        for name, shape in checkpoint_shapes(cfg).items():
            *path, leaf = name.split(".")
            mod = self
            for part in path:
                if not hasattr(mod, part):
                    mod.add_module(part, torch.nn.Linear(1, 1, bias=False) if part.endswith("_proj") or
                                   part == "lm_head" else torch.nn.Module())
                mod = getattr(mod, part)
            if isinstance(mod, torch.nn.Linear):
                mod.in_features, mod.out_features = shape[1], shape[0]
            setattr(mod, leaf, torch.nn.Parameter(torch.zeros(shape)))


def test_merged_peft_model_as_the_peft_library_writes_it(root, tuned, tmp_path):
    peft = pytest.importorskip("peft")
    base = _PeftStyle(CFG)
    base.load_state_dict(_published(tuned), strict=True)
    torch.manual_seed(1)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                         "gate_proj"],
                                                      init_lora_weights=False))
    unmerged = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"transformer_weights: .*LoRA factors .*lora_A"):
        read_weights(root / "transformer", overlay=_write(unmerged, tmp_path / "unmerged.bin"))
    merged_base = model.merge_and_unload()  # the PeftModel keeps the merged layers under base_model.model.
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(k.startswith("base_model.model.") for k in state) and not any("lora" in k for k in state)
    engine = ue.Engine.from_pretrained(root, device="cpu", transformer_weights=_write(state, tmp_path / "m.bin"))
    expected = ue.URSATransformer(CFG)
    expected.load_state_dict(read_weights(root / "transformer",
                                          overlay=_write(dict(merged_base.state_dict()), tmp_path / "plain.bin"))[1])
    _assert_same_model(engine.model, expected)
    assert not torch.equal(engine.model.model.layers[0].self_attn.qkv_proj.weight,
                           tuned.model.layers[0].self_attn.qkv_proj.weight)  # the LoRA delta is in


def test_bin_transformer_folder(tmp_path, tuned):
    root = write_tiny_root(tmp_path / "root", with_vae=False, seed=0)
    ref = ue.Engine.from_pretrained(root, device="cpu").model
    tdir = root / "transformer"
    st = tdir / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(st), tdir / "diffusion_pytorch_model.bin")
    st.unlink()
    _assert_same_model(ue.Engine.from_pretrained(root, device="cpu").model, ref)
    _assert_same_model(ue.URSATransformer.from_pretrained(tdir), ref)
    (tdir / "diffusion_pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match=r"found none"):
        ue.Engine.from_pretrained(root, device="cpu")


class _Evil:
    """Unpickling this would create a file: weights_only=True must refuse it before anything runs."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickle_needing_more_than_tensors_is_refused_and_runs_nothing(root, tuned, tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.bin"
    torch.save({**_published(tuned), "payload": _Evil(marker)}, path)
    with pytest.raises(CheckpointError) as err:
        ue.Engine.from_pretrained(root, device="cpu", transformer_weights=path)
    msg = str(err.value)
    assert msg.startswith("transformer_weights: ") and "refused" in msg and "weights_only=True" in msg
    assert "Unsupported global: GLOBAL" in msg  # torch's reason: the global it would not load
    assert not marker.exists()


def test_folder_bin_needing_more_is_refused(tmp_path, tuned):
    root = write_tiny_root(tmp_path / "root", with_vae=False)
    tdir = root / "transformer"
    (tdir / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({**_published(tuned), "payload": _Evil(tmp_path / "ran")}, tdir / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refused"):
        ue.URSATransformer.from_pretrained(tdir)
    assert not (tmp_path / "ran").exists()


def test_every_bad_key_in_one_error(root, tuned, tmp_path):
    state = _published(tuned)
    del state["model.norm.weight"]
    state["model.layers.0.mlp.extra.weight"] = torch.zeros(3)
    state["module.model.layers.0.mlp.up_proj.weight"] = state.pop("model.layers.0.mlp.up_proj.weight")[:-1]
    state["lm_head.weight"] = state["lm_head.weight"].long()
    with pytest.raises(CheckpointError) as err:
        ue.Engine.from_pretrained(root, device="cpu", transformer_weights=_write(state, tmp_path / "bad.pt"))
    msg = str(err.value)
    assert msg.startswith("transformer_weights: ") and str(root / "transformer" / "config.json") in msg
    for part in ("missing weights: model.norm.weight", "unexpected weights: model.layers.0.mlp.extra.weight",
                 "model.layers.0.mlp.up_proj.weight has shape", "lm_head.weight has dtype torch.int64"):
        assert part in msg, msg


@pytest.mark.parametrize("make, match", [
    (lambda p: p.with_suffix(".ckpt").write_bytes(b"x") and p.with_suffix(".ckpt"), "unknown suffix '.ckpt'"),
    (lambda p: p.with_suffix(".bin").write_bytes(b"not a pickle") and p.with_suffix(".bin"),
     "not a readable torch file"),
    (lambda p: _write({"a": torch.ones(1), "step": 3}, p.with_suffix(".pt")), r"entries step are not tensors"),
    (lambda p: _write([torch.ones(1)], p.with_suffix(".pt")), "holds a list"),
    (lambda p: p.with_suffix(".safetensors").write_bytes(b"garbage") and p.with_suffix(".safetensors"),
     "not a readable safetensors"),
    (lambda p: p.parent / "nope.bin", "does not exist"),
])
def test_unreadable_overlays_are_named(root, tmp_path, make, match):
    with pytest.raises(CheckpointError, match=f"^transformer_weights: .*{match}"):
        read_weights(root / "transformer", overlay=make(tmp_path / "w"))


def test_pipeline_and_cli_take_the_overlay(root, tuned, tmp_path, capsys, monkeypatch):
    path = _write(_published(tuned), tmp_path / "diffusion_pytorch_model.bin")
    pipe = ue.URSAPipeline.from_pretrained(str(root), device="cpu", transformer_weights=path)
    _assert_same_model(pipe.transformer, tuned)

    tuned_root = write_tiny_root(tmp_path / "tuned_root", with_vae=False, seed=0)
    tuned.save_pretrained(tuned_root / "transformer")
    monkeypatch.chdir(tmp_path)
    argv = ["generate", "--prompt", "a bear", "--latents-shape", "1", "2", "3", "--steps", "2", "--device", "cpu",
            "--prompt-length", "8", "--no-progress"]
    assert main([argv[0], str(root), *argv[1:], "--out", "over.pt", "--transformer-weights", str(path)]) == 0
    assert main([argv[0], str(tuned_root), *argv[1:], "--out", "ref.pt"]) == 0
    assert main([argv[0], str(root), *argv[1:], "--out", "base.pt"]) == 0
    capsys.readouterr()
    over, ref, base = (torch.load(tmp_path / f, weights_only=True) for f in ("over.pt", "ref.pt", "base.pt"))
    assert torch.equal(over, ref) and not torch.equal(over, base)

    assert main([argv[0], str(root), *argv[1:], "--transformer-weights", str(tmp_path / "missing.bin")]) == 2
    assert "--transformer-weights: " in capsys.readouterr().err
    bad = _write({k: v for k, v in _published(tuned).items() if k != "lm_head.weight"}, tmp_path / "bad.bin")
    assert main([argv[0], str(root), *argv[1:], "--transformer-weights", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ursa-engine: error: --transformer-weights: ") and "missing weights: lm_head.weight" in err


def test_legacy_non_zip_torch_file(root, tuned, tmp_path):
    """A pre-1.6 (non-zip) torch file cannot be memory-mapped: it is read whole, still with weights_only=True."""
    path = tmp_path / "legacy.pth"
    torch.save(_published(tuned), path, _use_new_zipfile_serialization=False)
    _assert_same_model(ue.Engine.from_pretrained(root, device="cpu", transformer_weights=path).model, tuned)


def test_serve_names_the_flag_of_a_bad_overlay(root, tuned, tmp_path, capsys):
    bad = _write({k: v for k, v in _published(tuned).items() if k != "lm_head.weight"}, tmp_path / "bad.bin")
    assert main(["serve", str(root), "--device", "cpu", "--transformer-weights", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ursa-engine: error: --transformer-weights: ") and "lm_head.weight" in err
