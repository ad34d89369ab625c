"""LoRA adapters in PEFT's layout (issue 19 item 3, DESIGN §9): merged and per-row application against
the ``peft`` library itself, exact unmerge, refusals, the engine / pipeline / CLI entry points."""

import json

import pytest
import torch
from roots import write_tiny_root
from torch import nn

import ursa_engine as ue
from ursa_engine import adapters
from ursa_engine.adapters import AdapterError, MergedAdapters, RowAdapters, read_adapter
from ursa_engine.checkpoint import to_checkpoint_state_dict
from ursa_engine.model import URSATransformer

CFG = ue.ModelConfig.preset("tiny")
FP32 = 1e-5  # logits vs peft's forward: both fp32, different association of the same sums


def tiny_model(seed=0, dtype=torch.float32):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return URSATransformer(CFG, init_std=0.2, dtype=dtype)


def text_inputs(B=3, L=11, seed=5):
    ids = torch.randint(0, CFG.lm_vocab_size, (B, L), generator=torch.Generator().manual_seed(seed))
    return ids, torch.arange(L)[:, None].expand(-1, 3)  # (p, p, p): our 3D RoPE reduces to HF's 1D RoPE


class HFWithHead(nn.Module):
    """The authors' module names over HF Qwen3 (``model.layers.N.self_attn.q_proj``...) and a ``lm_head``."""

    def __init__(self, model: URSATransformer):
        super().__init__()
        transformers = pytest.importorskip("transformers")
        hf_cfg = transformers.Qwen3Config(
            vocab_size=CFG.vocab_size, hidden_size=CFG.hidden_size, intermediate_size=CFG.intermediate_size,
            num_hidden_layers=CFG.num_hidden_layers, num_attention_heads=CFG.num_attention_heads,
            num_key_value_heads=CFG.num_key_value_heads, head_dim=CFG.head_dim, rms_norm_eps=CFG.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": CFG.rope_theta}, max_position_embeddings=4096,
            tie_word_embeddings=False, attention_bias=False, use_sliding_window=False)
        hf_cfg._attn_implementation = "eager"
        self.model = transformers.Qwen3Model(hf_cfg).eval()
        self.lm_head = nn.Linear(CFG.hidden_size, CFG.lm_head_size, bias=False)
        state = to_checkpoint_state_dict(model.state_dict(), CFG)
        self.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True)

    def forward(self, input_ids):
        B, L = input_ids.shape
        full = torch.zeros(B, 1, L, L)  # additive mask: bidirectional, as URSA
        return self.lm_head(self.model(input_ids=input_ids, attention_mask=full).last_hidden_state)


def peft_adapter(model: URSATransformer, folder, *, r=4, alpha=8.0, targets=adapters.TARGETS, rslora=False, seed=1,
                 **extra):
    """An adapter made and saved by peft on the HF twin of ``model``; returns (peft model, folder)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    hf = HFWithHead(model)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                                 use_rslora=rslora, lora_dropout=0.0, **extra))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: an adapter that changes nothing tests nothing
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.eval()
    pm.save_pretrained(str(folder))
    return pm, folder


@pytest.mark.parametrize("rslora, targets", [(False, adapters.TARGETS), (True, adapters.TARGETS),
                                             (False, ("q_proj", "v_proj", "down_proj"))])
def test_merged_and_per_row_logits_match_peft(tmp_path, rslora, targets):
    model = tiny_model()
    pm, folder = peft_adapter(model, tmp_path / "a", r=4, alpha=6.0, targets=targets, rslora=rslora)
    assert (folder / "adapter_model.safetensors").is_file()
    ids, pos = text_inputs()
    with torch.no_grad():
        ref = pm(ids).double()
        base = model(ids, pos).double()
    assert (ref - base).abs().max() > 1e-2  # the adapter matters
    lora = read_adapter(folder, CFG)
    assert lora.targets == tuple(t for t in adapters.TARGETS if t in targets) and lora.rslora == rslora
    rows = RowAdapters(model)
    rows.add("a", folder)
    with torch.no_grad(), rows.rows(["a", None, "a"]):
        mixed = model(ids, pos).double()
    torch.testing.assert_close(mixed[[0, 2]], ref[[0, 2]], rtol=FP32, atol=FP32)
    assert torch.equal(mixed[1], base[1])  # a row of no adapter is the base model's
    rows.remove()
    merged = MergedAdapters(model)
    merged.load(folder)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, pos).double(), ref, rtol=FP32, atol=FP32)


def test_unload_restores_base_weights_bit_for_bit_bf16(tmp_path):
    model = tiny_model(dtype=torch.bfloat16)
    src = tiny_model()
    _, fa = peft_adapter(src, tmp_path / "a", seed=1)
    _, fb = peft_adapter(src, tmp_path / "b", r=2, alpha=3.0, targets=("gate_proj", "o_proj"), seed=2)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    merged = MergedAdapters(model)
    merged.load(fa, scale=0.7)
    only_a = {k: v.clone() for k, v in model.state_dict().items()}
    assert not torch.equal(only_a["model.layers.0.self_attn.qkv_proj.weight"],
                           base["model.layers.0.self_attn.qkv_proj.weight"])
    merged.load(fb, name="b")
    gu = "model.layers.1.mlp.gate_up_proj.weight"
    assert not torch.equal(model.model.layers[1].mlp.gate_up_proj.weight, only_a[gu])
    merged.unload("b")  # back to exactly the weights of a alone (recomputed from the base copy)
    for k, v in model.state_dict().items():
        assert torch.equal(v, only_a[k]), k
    merged.unload()
    for k, v in model.state_dict().items():
        assert torch.equal(v, base[k]), k
        assert v.data_ptr() == ptrs[k], k  # written in place: captured CUDA graphs read the new values
    assert merged._base == {}


def test_scale_and_several_adapters_add(tmp_path):
    model = tiny_model()
    _, fa = peft_adapter(model, tmp_path / "a", seed=1)
    _, fb = peft_adapter(model, tmp_path / "b", seed=2, targets=("k_proj", "up_proj"))
    a, b = read_adapter(fa, CFG), read_adapter(fb, CFG)
    w0 = model.model.layers[0].mlp.gate_up_proj.weight.clone()
    merged = MergedAdapters(model)
    merged.load(fa, scale=0.5)
    merged.load(fb, scale=-2.0)
    inter = CFG.intermediate_size
    want = w0.clone()
    pa, pb = "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"
    want[:inter] += 0.5 * a.scaling * (a.weights[pa][1] @ a.weights[pa][0])
    want[inter:] += 0.5 * a.scaling * (a.weights[pb][1] @ a.weights[pb][0])
    want[inter:] += -2.0 * b.scaling * (b.weights[pb][1] @ b.weights[pb][0])
    torch.testing.assert_close(model.model.layers[0].mlp.gate_up_proj.weight, want, rtol=1e-6, atol=1e-6)
    merged.set_scale(0.0)  # round(W + 0) = W exactly in fp32
    assert torch.equal(model.model.layers[0].mlp.gate_up_proj.weight, w0)


def write_config(folder, **over):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(over)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("over, words", [
    ({"use_dora": True}, "use_dora"), ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"peft_type": "LOHA"}, "LOHA"), ({"bias": "all"}, "bias"), ({"target_modules": ["q_proj", "lm_head"]}, "lm_head"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"), ({"r": 0}, "r must"),
    ({"init_lora_weights": "pissa"}, "pissa"), ({"init_lora_weights": "olora"}, "olora"),
    ({"init_lora_weights": "corda"}, "corda"), ({"loftq_config": {"loftq_bits": 4}}, "LoftQ")])
def test_unsupported_configs_are_refused_by_name(tmp_path, over, words):
    _, folder = peft_adapter(tiny_model(), tmp_path / "a", targets=("q_proj",))
    write_config(folder, **over)
    with pytest.raises(AdapterError, match=words):
        read_adapter(folder, CFG)


def test_bad_keys_and_shapes_are_listed(tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder = peft_adapter(tiny_model(), tmp_path / "a", targets=("q_proj", "v_proj"))
    state = load_file(folder / "adapter_model.safetensors")
    extra = dict(state)
    extra["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, CFG.hidden_size)
    save_file(extra, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="lm_head"):
        read_adapter(folder, CFG)
    bad = dict(state)
    k = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    bad[k] = torch.zeros(7, 4)
    del bad["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    save_file(bad, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="layers.0.self_attn.q_proj"):  # unpaired A
        read_adapter(folder, CFG)
    bad["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(64, 4)
    save_file(bad, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"1 mis-shaped weight.*v_proj.lora_B \(7, 4\)"):
        read_adapter(folder, CFG)
    big = ue.ModelConfig.preset("tiny", num_hidden_layers=1)
    save_file(state, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="module.*this model does not have.*layers.1"):
        read_adapter(folder, big)


def test_bin_adapters_load_with_weights_only(tmp_path):
    model = tiny_model()
    _, folder = peft_adapter(model, tmp_path / "a", targets=("o_proj",))
    from safetensors.torch import load_file

    state = load_file(folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").unlink()
    torch.save(state, folder / "adapter_model.bin")
    lora = read_adapter(folder, CFG)
    assert set(lora.state_dict()) == set(state)
    torch.save({"weights": state, "why": Exotic()}, folder / "adapter_model.bin")
    with pytest.raises(AdapterError, match="weights_only=True"):
        read_adapter(folder, CFG)


class Exotic:  # a pickle that needs more than tensors
    pass


def test_engine_load_unload_and_pipeline_names(tmp_path):
    root = write_tiny_root(tmp_path / "root", with_vae=False)
    engine = ue.Engine.from_pretrained(root, dtype=torch.float32, device="cpu", mode="eager")
    src = engine.model
    _, folder = peft_adapter(src, tmp_path / "style", seed=3)
    kw = dict(latents_shape=(1, 3, 4), num_steps=6, guidance_scale=3.0, seed=11, decode=False)
    prompt = [[3, 4, 5]]
    base = engine.generate(prompt, **kw).tokens
    base_w = {k: v.clone() for k, v in engine.model.state_dict().items()}
    assert engine.load_lora(folder) == "style" and engine.loras == {"style": 1.0}
    styled = engine.generate(prompt, **kw).tokens
    assert not torch.equal(styled, base)
    with pytest.raises(ValueError, match="name: an adapter 'style' is already loaded"):
        engine.load_lora(folder, name="style")
    with pytest.raises(ValueError, match="name: no adapter 'x'"):
        engine.unload_lora("x")
    engine.unload_lora()
    assert engine.loras == {} and torch.equal(engine.generate(prompt, **kw).tokens, base)
    assert all(torch.equal(v, base_w[k]) for k, v in engine.model.state_dict().items())

    pipe = ue.URSAPipeline(engine)
    pipe.load_lora_weights(str(folder), adapter_name="s")
    assert torch.equal(engine.generate(prompt, **kw).tokens, styled)
    pipe.fuse_lora(lora_scale=0.0)
    assert all(torch.equal(v, base_w[k]) for k, v in engine.model.state_dict().items())
    pipe.fuse_lora(lora_scale=1.0)
    assert torch.equal(engine.generate(prompt, **kw).tokens, styled)
    pipe.unload_lora_weights()
    assert all(torch.equal(v, base_w[k]) for k, v in engine.model.state_dict().items())
    with pytest.raises(ValueError, match="fuse_lora: no LoRA"):
        pipe.fuse_lora()


def test_guided_rows_of_a_row_adapter_equal_its_merged_run(tmp_path):
    """Cond and uncond rows of an adapter's request take its delta: logits equal the merged model's."""
    model = tiny_model()
    _, folder = peft_adapter(model, tmp_path / "a", seed=4)
    ids, pos = text_inputs(B=4)
    rows = RowAdapters(model)
    rows.add("a", folder, scale=0.5)
    with torch.no_grad(), rows.rows(["a", None, "a", None]):
        mixed = model(ids, pos)
    rows.remove()
    merged = MergedAdapters(model)
    merged.load(folder, scale=0.5)
    with torch.no_grad():
        want = model(ids, pos)
    merged.unload()
    with torch.no_grad():
        plain = model(ids, pos)
    torch.testing.assert_close(mixed[[0, 2]], want[[0, 2]], rtol=FP32, atol=FP32)
    assert torch.equal(mixed[[1, 3]], plain[[1, 3]])
    assert RowAdapters.runs(["a", "a", None, "b", "a", "a"]) == [("a", 0, 2), ("b", 3, 4), ("a", 4, 6)]
    with pytest.raises(ValueError, match="lora: no adapter 'zz'"), rows.rows(["zz"]):
        pass


def test_training_adapter_saves_what_the_engine_loads(tmp_path):
    """training.LoRAAdapter (hooks, trainable) and the engine's merged / per-row adapters share one layout."""
    from ursa_engine.training import LoRAAdapter

    model = tiny_model()
    ids, pos = text_inputs()
    trained = LoRAAdapter(model, 3, alpha=5.0, targets=("k_proj", "gate_proj", "o_proj"), rslora=True, seed=2)
    with torch.no_grad():
        for b in trained.lora_B.values():
            b.normal_(std=0.2, generator=torch.Generator().manual_seed(3))
        hooked = model(ids, pos)
    trained.save_pretrained(tmp_path / "t")
    trained.remove()
    lora = read_adapter(tmp_path / "t", CFG)
    assert lora.rslora and lora.targets == ("k_proj", "o_proj", "gate_proj")
    merged = MergedAdapters(model)
    merged.load(tmp_path / "t")
    with torch.no_grad():
        torch.testing.assert_close(model(ids, pos), hooked, rtol=FP32, atol=FP32)


def test_cli_generate_lora_flag(tmp_path, monkeypatch, capsys):
    from ursa_engine.cli import main

    root = write_tiny_root(tmp_path / "root", with_vae=False)
    engine = ue.Engine.from_pretrained(root, dtype=torch.float32, device="cpu", mode="eager", prompt_length=8)
    _, folder = peft_adapter(engine.model, tmp_path / "style", seed=5)
    monkeypatch.chdir(tmp_path)
    argv = ["generate", str(root), "--prompt", "a bear", "--latents-shape", "3", "4", "--out", "t.pt", "--steps", "3",
            "--device", "cpu", "--dtype", "float32", "--prompt-length", "8", "--no-progress", "--mode", "eager",
            "--guidance", "3", "--seed", "4"]
    assert main(argv + ["--lora", f"{folder}:0.5"]) == 0
    got = torch.load(tmp_path / "t.pt")
    engine.load_lora(folder, 0.5)
    want = engine.generate(["a bear"], [ue.engine.NEGATIVE_PROMPT], latents_shape=(1, 3, 4), num_steps=3,
                           guidance_scale=3.0, seed=4, decode=False).tokens  # the CLI's default negative prompt
    engine.unload_lora()
    assert not torch.equal(got, engine.generate(["a bear"], [ue.engine.NEGATIVE_PROMPT], latents_shape=(1, 3, 4),
                                                num_steps=3, guidance_scale=3.0, seed=4, decode=False).tokens)
    assert torch.equal(got, want)
    capsys.readouterr()
    assert main(argv + ["--lora", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ursa-engine: error: --lora: ") and "nowhere is not an adapter folder" in err
    write_config(folder, use_dora=True)
    assert main(argv + ["--lora", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ursa-engine: error: --lora: ") and "use_dora" in err, err


@pytest.mark.parametrize("damage", ["truncated-safetensors", "garbage-bin", "config-list"])
def test_corrupt_adapter_files_are_one_adapter_error(tmp_path, damage):
    _, folder = peft_adapter(tiny_model(), tmp_path / "a", targets=("q_proj",))
    weights = folder / "adapter_model.safetensors"
    if damage == "truncated-safetensors":
        weights.write_bytes(weights.read_bytes()[:40])
    elif damage == "garbage-bin":
        weights.unlink()
        (folder / "adapter_model.bin").write_bytes(b"not a torch file at all")
    else:
        (folder / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(AdapterError, match=str(folder)):
        read_adapter(folder, CFG)


def test_pipeline_lora_errors_name_the_diffusers_arguments_and_fuse_checks_first(tmp_path):
    from roots import write_tiny_root

    root = write_tiny_root(tmp_path / "root", with_vae=False, seed=0)
    pipe = ue.URSAPipeline.from_pretrained(str(root), device="cpu")
    _, folder = peft_adapter(pipe.transformer, tmp_path / "a", targets=("q_proj",))
    with pytest.raises(ValueError, match="weight_name"):
        pipe.load_lora_weights(str(folder), weight_name="pytorch_lora_weights.safetensors")
    pipe.load_lora_weights(str(folder), adapter_name="s")
    with pytest.raises(ValueError, match="^adapter_name:"):
        pipe.load_lora_weights(str(folder), adapter_name="s")
    before = pipe.transformer.model.layers[0].self_attn.qkv_proj.weight.clone()
    with pytest.raises(ValueError, match="adapter_names"):
        pipe.fuse_lora(0.5, adapter_names=["s", "zz"])
    assert torch.equal(pipe.transformer.model.layers[0].self_attn.qkv_proj.weight, before)  # nothing half-merged
