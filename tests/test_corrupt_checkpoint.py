"""Corrupted checkpoints give one clear ``CheckpointError`` naming the file (issue 20, item 4).

A tiny transformer is saved (single file and sharded), then damaged: truncated, a header lying about
its offsets, an unknown dtype, a huge header length, a missing shard, a symlink loop.
"""

import json
import os
import struct

import pytest
import torch

import ursa_engine as ue
from ursa_engine.checkpoint import CheckpointError, read_state_dict, read_weights, save_transformer

CFG = ue.ModelConfig.preset("tiny")
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ue.URSATransformer(CFG, init_std=0.2)


def _header(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_header(path, header, data):
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _truncate(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _lie_offsets(p):
    header, data = _header(p)
    name = next(k for k in header if k != "__metadata__")
    a, b = header[name]["data_offsets"]
    header[name]["data_offsets"] = [a, b + 10**6]
    _write_header(p, header, data)


def _wrong_dtype(p):
    header, data = _header(p)
    for k, v in header.items():
        if k != "__metadata__":
            v["dtype"] = "Q7"
    _write_header(p, header, data)


def _huge_header(p):
    raw = p.read_bytes()
    p.write_bytes(struct.pack("<Q", 2**62) + raw[8:])


def _garbage_header(p):
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    p.write_bytes(raw[:8] + b"\xff" * n + raw[8 + n:])


DAMAGE = {"truncated": _truncate, "lying offsets": _lie_offsets, "unknown dtype": _wrong_dtype,
          "huge header": _huge_header, "garbage header": _garbage_header}


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_a_damaged_weights_file_is_one_error_naming_it(tmp_path, model, how):
    save_transformer(model, tmp_path)
    path = tmp_path / WEIGHTS
    DAMAGE[how](path)
    with pytest.raises(CheckpointError, match=WEIGHTS):
        read_weights(tmp_path)
    with pytest.raises(CheckpointError, match=WEIGHTS):
        read_state_dict(path, name="transformer_weights")


@pytest.mark.parametrize("how", ["truncated", "lying offsets", "huge header"])
def test_a_damaged_shard_is_one_error_naming_it(tmp_path, model, how):
    save_transformer(model, tmp_path, max_shard_size=20_000)
    shards = sorted(tmp_path.glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 2
    DAMAGE[how](shards[1])
    with pytest.raises(CheckpointError, match=shards[1].name):
        read_weights(tmp_path)


def test_a_missing_shard_is_named(tmp_path, model):
    save_transformer(model, tmp_path, max_shard_size=20_000)
    shard = sorted(tmp_path.glob("diffusion_pytorch_model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        read_weights(tmp_path)


def test_a_symlink_loop_is_named(tmp_path, model):
    save_transformer(model, tmp_path)
    path = tmp_path / WEIGHTS
    path.unlink()
    os.symlink(WEIGHTS + ".b", path)
    os.symlink(WEIGHTS, tmp_path / (WEIGHTS + ".b"))
    with pytest.raises(CheckpointError, match=WEIGHTS):
        read_weights(tmp_path)
    with pytest.raises(CheckpointError, match=WEIGHTS):
        read_state_dict(path)
    loop = tmp_path / "loop"
    os.symlink("loop", loop)
    with pytest.raises(CheckpointError, match="loop"):
        read_weights(loop)


def test_a_weight_of_an_integer_dtype_is_named(tmp_path, model):
    from safetensors.torch import load_file, save_file

    save_transformer(model, tmp_path)
    path = tmp_path / WEIGHTS
    state = load_file(path)
    name = sorted(state)[3]
    state[name] = state[name].to(torch.int32)
    save_file(state, path)
    with pytest.raises(CheckpointError, match=rf"{name} has dtype I32, expected a float type"):
        read_weights(tmp_path)
