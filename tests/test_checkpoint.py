"""transformer/ folders: save / load round trips, sharding, and clear errors for bad checkpoints;
the prompt tokenizer's padding rules."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ursa_engine.checkpoint import CheckpointError, checkpoint_shapes, save_transformer
from ursa_engine.model import ModelConfig, URSATransformer, latent_positions, sequence_ids
from ursa_engine.tokenizer import PromptTokenizer, motion_prompt, pad_prompt_ids

TINY = ModelConfig.preset("tiny", num_hidden_layers=1)


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return URSATransformer(TINY)


def _logits(m):
    g = torch.Generator().manual_seed(3)
    ids = sequence_ids(torch.randint(0, 500, (1, 4), generator=g), torch.randint(0, 64, (1, 2, 2), generator=g),
                       TINY)
    return m(ids, latent_positions(4, (2, 2)))


def _weights(folder):
    return load_file(folder / "diffusion_pytorch_model.safetensors")


def test_round_trip_single_file(tmp_path, model):
    save_transformer(model, tmp_path)
    assert set(_weights(tmp_path)) == set(checkpoint_shapes(TINY))  # Qwen3 names on disk
    loaded = URSATransformer.from_pretrained(tmp_path)
    assert loaded.config == TINY and loaded.dtype == torch.float32
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)


def test_round_trip_sharded_with_index(tmp_path, model):
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    torch.testing.assert_close(_logits(URSATransformer.from_pretrained(tmp_path)), _logits(model), rtol=0, atol=0)


def test_default_dtype_is_the_checkpoints_and_can_be_overridden(tmp_path, model):
    save_transformer(model, tmp_path, dtype=torch.bfloat16)
    assert URSATransformer.from_pretrained(tmp_path).dtype == torch.bfloat16
    assert URSATransformer.from_pretrained(tmp_path, dtype=torch.float32).dtype == torch.float32


def test_variant_file(tmp_path, model):
    save_transformer(model, tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").rename(tmp_path / "diffusion_pytorch_model.fp16.safetensors")
    with pytest.raises(CheckpointError, match="found none"):
        URSATransformer.from_pretrained(tmp_path)
    assert URSATransformer.from_pretrained(tmp_path, variant="fp16").config == TINY


def test_missing_folder_and_config(tmp_path, model):
    with pytest.raises(CheckpointError, match="no config.json"):
        URSATransformer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid transformer config"):
        URSATransformer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**TINY.to_dict(), "num_key_value_heads": 3}))
    with pytest.raises(CheckpointError, match="num_key_value_heads"):
        URSATransformer.from_pretrained(tmp_path)


def test_no_weights_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_dict()))
    with pytest.raises(CheckpointError, match="safetensors"):
        URSATransformer.from_pretrained(tmp_path)


def test_missing_unexpected_and_misshaped_weights_are_all_named(tmp_path, model):
    save_transformer(model, tmp_path)
    w = _weights(tmp_path)
    del w["model.layers.0.mlp.up_proj.weight"]
    w["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(3)
    w["lm_head.weight"] = torch.zeros(65, TINY.hidden_size)
    save_file(w, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError) as err:
        URSATransformer.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "missing weights: model.layers.0.mlp.up_proj.weight" in msg
    assert "unexpected weights: model.layers.0.self_attn.q_proj.bias" in msg
    assert "lm_head.weight has shape (65, 64), the config implies (64, 64)" in msg


def test_checkpoint_of_another_size_fails_on_shapes(tmp_path, model):
    save_transformer(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    with pytest.raises(CheckpointError, match=r"mlp.gate_proj.weight has shape \(96, 64\)"):
        URSATransformer.from_pretrained(tmp_path)


def test_index_naming_a_missing_shard(tmp_path, model):
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    next(tmp_path.glob("*-00002-of-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="shard files that do not exist"):
        URSATransformer.from_pretrained(tmp_path)


def test_integer_weights_are_rejected(tmp_path, model):
    save_transformer(model, tmp_path)
    w = _weights(tmp_path)
    w["model.norm.weight"] = torch.ones(TINY.hidden_size, dtype=torch.int32)
    save_file(w, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="model.norm.weight has dtype I32"):
        URSATransformer.from_pretrained(tmp_path)


def test_config_without_optional_fields_takes_qwen3_defaults():
    cfg = ModelConfig.from_dict({"hidden_size": 1024, "intermediate_size": 3072, "num_attention_heads": 16,
                                 "num_key_value_heads": 8, "num_hidden_layers": 28, "rope_theta": 1000000,
                                 "vocab_size": 215669, "lm_vocab_size": 151669, "lm_head_size": 64000,
                                 "bov_token_id": 151652, "_class_name": "URSATransformer3DModel"})
    assert cfg == ModelConfig.preset("ursa-0.6b")


# ---- tokenizer ---------------------------------------------------------------------------------

def test_pad_prompt_ids_left_pads_and_truncates():
    ids = pad_prompt_ids([[5, 6, 7], [], list(range(10, 20))], pad_id=1, length=6)
    assert ids.tolist() == [[1, 1, 1, 5, 6, 7], [1] * 6, [10, 11, 12, 13, 14, 15]]
    assert pad_prompt_ids(torch.tensor([3, 4]), pad_id=0, length=3).tolist() == [[0, 3, 4]]
    with pytest.raises(TypeError, match="integer"):
        pad_prompt_ids(torch.ones(2, 3), pad_id=0)


def test_motion_prefix():
    assert motion_prompt("a bear", 9) == "motion=9.0, a bear"
    assert motion_prompt("a bear", None) == "a bear"


def test_prompt_tokenizer_from_folder(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<|endoftext|>": 0, "<pad>": 1, "[UNK]": 2, "a": 3, "bear": 4, "motion=9.0,": 5}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    t = PromptTokenizer.from_pretrained(tmp_path, length=5)
    assert t.pad_id == 0  # Qwen3's default pad
    assert t.encode(["a bear", ""]).tolist() == [[0, 0, 0, 3, 4], [0] * 5]
    assert t.encode("a bear", motion=9).tolist() == [[0, 0, 5, 3, 4]]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
    assert PromptTokenizer.from_pretrained(tmp_path, length=3).encode("bear").tolist() == [[1, 1, 4]]


def test_saving_over_a_checkpoint_replaces_its_weights(tmp_path, model):
    torch.manual_seed(1)
    other = URSATransformer(TINY)
    folder = tmp_path / "transformer"
    model.save_pretrained(folder, max_shard_size="20KB")  # shards + index
    save_transformer(other, folder)  # then one file into the same folder
    assert not list(folder.glob("*.index.json")) and len(list(folder.glob("*.safetensors"))) == 1
    torch.testing.assert_close(_logits(URSATransformer.from_pretrained(folder)), _logits(other), rtol=0, atol=0)
    save_transformer(model, folder, max_shard_size="20KB")  # and back to shards
    torch.testing.assert_close(_logits(URSATransformer.from_pretrained(folder)), _logits(model), rtol=0, atol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["transformer"]  # no temporary folder left


def test_config_json_is_written_after_the_weights(tmp_path, model, monkeypatch):
    import ursa_engine.checkpoint as ckpt

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_transformer(model, tmp_path / "t")
    assert not (tmp_path / "t" / "config.json").exists()


def test_variant_index_is_ignored_without_a_variant(tmp_path, model):
    torch.manual_seed(1)
    other = URSATransformer(TINY)
    save_transformer(model, tmp_path / "a")  # the plain single file
    save_transformer(other, tmp_path / "b", max_shard_size="20KB")
    index = json.loads((tmp_path / "b" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):  # the variant's shards, named as diffusers does
        (tmp_path / "b" / shard).rename(tmp_path / "a" / shard.replace("model-", "model.fp16-"))
    index["weight_map"] = {k: v.replace("model-", "model.fp16-") for k, v in index["weight_map"].items()}
    (tmp_path / "a" / "diffusion_pytorch_model.fp16.safetensors.index.json").write_text(json.dumps(index))
    torch.testing.assert_close(_logits(URSATransformer.from_pretrained(tmp_path / "a")), _logits(model), rtol=0, atol=0)
    torch.testing.assert_close(_logits(URSATransformer.from_pretrained(tmp_path / "a", variant="fp16")), _logits(other),
                               rtol=0, atol=0)
