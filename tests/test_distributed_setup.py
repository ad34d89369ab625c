"""Many processes on torch.distributed (issue 13), the parts one process can check: layout parsing and
its errors (before any weight is read), the torchrun CLI and its teardown, bytes moved per layout.
The multi-process equality tests are in tests/test_distributed.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from roots import write_tiny_root
from test_distributed import PROMPT_LEN, _engine, _free_port

import ursa_engine as ue
from ursa_engine import cli
from ursa_engine import distributed as udist


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(write_tiny_root(tmp_path_factory.mktemp("dist_setup") / "root", with_vae=False))


# ------------------------------------------------------------------------------ layout errors
@pytest.mark.parametrize("text, match", [
    ("dp=2,tp=2", "parallel: unknown dim 'tp'"),
    ("cfg=3", "parallel: cfg=3"),
    ("dp=0", "parallel: dp must be a positive int"),
    ("dp2", "parallel: expected dims like"),
    ("dp=2,dp=2", "given twice"),
])
def test_parse_layout_names_the_argument(text, match):
    with pytest.raises(ValueError, match=match):
        udist.parse_layout(text)


def test_layout_parses():
    assert udist.parse_layout("sp=4, dp=2") == udist.Layout(dp=2, sp=4)
    assert str(udist.parse_layout("cfg=2")) == "dp=1,cfg=2,sp=1"


@pytest.mark.parametrize("layout, world, match", [
    ("dp=2,sp=2", "2", r"mesh: dp=2,cfg=1,sp=2 needs 4 processes .* the world has 2"),
    ("sp=4", "4", r"mesh: sp=4 does not divide the model's 2 key-value heads .* use sp in \[1, 2\]"),
])
def test_impossible_layout_fails_before_loading(root, monkeypatch, layout, world, match):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", world)

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were read before the layout was checked")

    monkeypatch.setattr(ue.URSATransformer, "from_pretrained", no_loading)
    with pytest.raises(ValueError, match=match):
        _engine(root, mesh=layout)
    assert not dist.is_initialized()


def test_layout_outside_torchrun_says_how_to_launch(root, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(RuntimeError, match="mesh: dp=2,cfg=1,sp=1 needs torch.distributed: launch with torchrun"):
        _engine(root, mesh="dp=2")


# ------------------------------------------------------------------------------ the command line
def test_torchrun_cli_writes_the_one_process_output(root, tmp_path):
    common = ["generate", root, "--prompt", "a cat", "--prompt", "a bear walking", "--latents-shape", "2", "3", "4",
              "--steps", "4", "--guidance", "3", "--guidance-trunc", "0.6", "--device", "cpu", "--no-progress",
              "--prompt-length", str(PROMPT_LEN)]
    assert cli.main([*common, "--out", str(tmp_path / "one.pt")]) == 0  # one process: this one
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    many = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "ursa_engine",
                           *common, "--parallel", "cfg=2", "--out", str(tmp_path / "many.pt")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert many.returncode == 0, many.stderr
    assert many.stdout.count('"out"') == 1  # only rank 0 writes and reports
    assert torch.equal(torch.load(tmp_path / "many.pt"), torch.load(tmp_path / "one.pt"))


def test_cli_parallel_destroys_the_process_group_it_created(root, tmp_path, monkeypatch):
    """--parallel: the CLI creates the process group (from torchrun's environment), so it tears it down
    (graphs released first) on every rank when it returns; here a world of one process."""
    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(_free_port())).items():
        monkeypatch.setenv(name, value)
    try:
        code = cli.main(["generate", root, "--prompt", "a cat", "--latents-shape", "2", "3", "4", "--steps", "2",
                         "--device", "cpu", "--no-progress", "--prompt-length", str(PROMPT_LEN),
                         "--out", str(tmp_path / "x.pt"), "--parallel", "dp=1"])
        assert code == 0 and (tmp_path / "x.pt").exists()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("parallel, env, match", [
    ("dp=2,tp=2", None, "--parallel: unknown dim 'tp'"),
    ("dp=2", None, "--parallel: dp=2,cfg=1,sp=1 runs 2 processes: launch with torchrun --nproc-per-node 2"),
    ("dp=2", "3", "--parallel: dp=2,cfg=1,sp=1 needs 2 processes .* the world has 3"),
])
def test_cli_parallel_errors_name_the_flag(root, tmp_path, monkeypatch, capsys, parallel, env, match):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    if env is not None:
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", env)
    code = cli.main(["generate", root, "--prompt", "a cat", "--latents-shape", "2", "3", "4", "--device", "cpu",
                     "--out", str(tmp_path / "x.pt"), "--parallel", parallel])
    assert code == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "x.pt").exists()


def test_bytes_per_step_at_1_7b():
    """The counts of bench_parallel at 1.7B, 13 x 40 x 64 (L = 33,601), bf16, one sample."""
    from ursa_engine.distributed.cost import step_bytes

    cfg = ue.ModelConfig.preset("ursa-1.7b")
    n, L = 33_280, 33_601
    cfg2 = step_bytes(cfg, (13, 40, 64), "cfg=2")
    assert cfg2["cfg_exchange"] == n // 2 * 2048 * 2  # half the latents' hidden states
    assert cfg2["cfg_logits_instead"] == n // 2 * 64_000 * 2  # 31x more
    assert cfg2["ulysses"] == 0 and cfg2["tokens"] == n // 2 * 8
    sp8 = step_bytes(cfg, (13, 40, 64), "sp=8")  # 2 rows, 4,201 positions a rank, q k v o of 16 + 8 + 8 + 16 heads
    assert sp8["ulysses"] == 28 * 2 * -(-L // 8) * (2 * 16 + 2 * 8) * 128 * 2 * 7 // 8
    assert step_bytes(cfg, (13, 40, 64), "dp=8")["total"] == 0
    past = step_bytes(cfg, (13, 40, 64), "cfg=2,sp=4", guided=False)  # 8 | 8 kv heads: all 8 ranks share it
    assert past["sequence_group"] == 8 and past["forward_ranks"] == 8
