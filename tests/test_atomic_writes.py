"""Every file we write is written atomically (issue 20, item 4): a writer made to fail midway leaves
neither a half-written output nor a temporary file, and an earlier output stays as it was."""

import json

import numpy as np
import pytest
import torch

import ursa_engine as ue
from ursa_engine import media
from ursa_engine.checkpoint import read_weights, save_transformer


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


class Boom(RuntimeError):
    pass


def _half_then_fail(path, *args, **kwargs):
    with open(path, "wb") as f:
        f.write(b"half")
    raise Boom("interrupted")


@pytest.mark.parametrize("out, writer", [("a.png", "_write_image"), ("a.jpg", "_write_image"),
                                         ("a.mp4", "_write_video")])
def test_media_writer_failing_midway_leaves_nothing(tmp_path, monkeypatch, out, writer):
    frames = np.zeros((1, 2, 8, 8, 3), np.uint8)
    monkeypatch.setattr(media, writer, _half_then_fail)
    with pytest.raises(Boom):
        media.save_output(tmp_path / out, frames)
    assert _files(tmp_path) == []


def test_failing_write_keeps_the_previous_output(tmp_path, monkeypatch):
    frames = np.full((1, 1, 8, 8, 3), 200, np.uint8)
    [path] = media.save_output(tmp_path / "a.png", frames)
    before = path.read_bytes()
    monkeypatch.setattr(media, "_write_image", _half_then_fail)
    with pytest.raises(Boom):
        media.save_output(tmp_path / "a.png", np.zeros_like(frames))
    assert path.read_bytes() == before and _files(tmp_path) == ["a.png"]


def test_pt_tokens_failing_midway_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", lambda obj, path, *a, **k: _half_then_fail(path))
    with pytest.raises(Boom):
        media.save_output(tmp_path / "t.pt", torch.zeros(1, 1, 2, 2, dtype=torch.long))
    assert _files(tmp_path) == []


def test_checkpoint_save_failing_midway_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    import ursa_engine.checkpoint as ckpt

    cfg = ue.ModelConfig.preset("tiny")
    torch.manual_seed(0)
    save_transformer(ue.URSATransformer(cfg, init_std=0.2), tmp_path / "t")
    before = {p: (tmp_path / "t" / p).read_bytes() for p in _files(tmp_path / "t")}
    calls = []

    def save_then_fail(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            open(path, "wb").write(b"half")
            raise Boom("interrupted")
        real(tensors, path, metadata=metadata)

    real = ckpt.save_file
    monkeypatch.setattr(ckpt, "save_file", save_then_fail)
    with pytest.raises(Boom):
        save_transformer(ue.URSATransformer(cfg, init_std=0.5), tmp_path / "t", max_shard_size=20_000)
    assert _files(tmp_path) == ["t", *("t/" + p for p in sorted(before))]
    assert {p: (tmp_path / "t" / p).read_bytes() for p in before} == before
    read_weights(tmp_path / "t")


def test_grpo_writers_failing_midway_leave_nothing(tmp_path, monkeypatch):
    from ursa_engine.training import grpo

    (tmp_path / "report.json").write_text('{"old": 1}')
    monkeypatch.setattr(grpo.json, "dump", lambda doc, f, **kw: (f.write('{"half'), (_ for _ in ()).throw(Boom())))
    with pytest.raises(Boom):
        grpo.write_json(tmp_path / "report.json", {"new": 2})
    assert _files(tmp_path) == ["report.json"] and json.loads((tmp_path / "report.json").read_text()) == {"old": 1}


def test_grpo_checkpoint_failing_midway_keeps_the_old_root(tmp_path):
    from ursa_engine.training import grpo

    base = tmp_path / "base"
    (base / "vae").mkdir(parents=True)
    (base / "vae" / "x.json").write_text("{}")
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "old.txt").write_text("old")

    class Model:
        def save_pretrained(self, folder):
            folder.mkdir()
            (folder / "half.safetensors").write_bytes(b"half")
            raise Boom("interrupted")

    class DM:
        engine = type("E", (), {"model": Model()})()

    with pytest.raises(Boom):
        grpo.save_checkpoint(DM(), base, out)
    assert _files(tmp_path) == ["base", "base/vae", "base/vae/x.json", "ckpt", "ckpt/old.txt"]


def test_lora_adapter_save_failing_midway_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    from ursa_engine.adapters import CONFIG_NAME, WEIGHTS_NAME
    from ursa_engine.training.lora import LoRAAdapter

    torch.manual_seed(0)
    adapter = LoRAAdapter(ue.URSATransformer(ue.ModelConfig.preset("tiny"), init_std=0.2), rank=2)
    adapter.save_pretrained(tmp_path)
    before = (tmp_path / WEIGHTS_NAME).read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file", lambda state, path, metadata=None: _half_then_fail(path))
    with pytest.raises(Boom):
        adapter.save_pretrained(tmp_path)
    assert _files(tmp_path) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == before


def test_result_text_writer_failing_midway_keeps_the_previous_result(tmp_path):
    from ursa_engine.benchmarks.provenance import write_text

    write_text(tmp_path / "sweep.json", '{"old": 1}')

    with pytest.raises(TypeError):
        write_text(tmp_path / "sweep.json", 12345)  # fails inside the write, after the temporary file exists
    assert _files(tmp_path) == ["sweep.json"] and (tmp_path / "sweep.json").read_text() == '{"old": 1}'


def test_digits_tokenizer_and_demo_png_writers_failing_midway_leave_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    from ursa_engine import demo
    from ursa_engine.digits.tokenizer import PatchTokenizer

    tok = PatchTokenizer(torch.zeros(4, 4), patch=2)
    monkeypatch.setattr(safetensors.torch, "save_file", lambda state, path, metadata=None: _half_then_fail(path))
    with pytest.raises(Boom):
        tok.save(tmp_path / "tok")
    assert _files(tmp_path / "tok") == []

    monkeypatch.setattr(demo.Path, "write_bytes", lambda self, data: _half_then_fail(self))
    with pytest.raises(Boom):
        demo.write_png(tmp_path / "d.png", np.zeros((4, 4), np.uint8))
    assert _files(tmp_path) == ["tok"]
