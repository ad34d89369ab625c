"""Hub ids as checkpoint roots (issue 19 item 1): a hub cache laid out by hand (``models--org--name/``:
``blobs/``, ``snapshots/<commit>/`` of symlinks, ``refs/<revision>``) serves ``Engine.from_pretrained``,
``URSAPipeline.from_pretrained`` and ``ursa-engine generate | plan`` offline; an unreachable hub falls back
to the cache; only the files a load reads are downloaded (the download itself is faked: no network in
tests); a missing id or revision gives one error naming the id, the cache and the command that fetches it."""

import hashlib
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from roots import write_tiny_root

import ursa_engine as ue
from ursa_engine import hub
from ursa_engine.cli import main
from ursa_engine.hub import HubError, resolve_root, root_files

huggingface_hub = pytest.importorskip("huggingface_hub")
hub_constants = pytest.importorskip("huggingface_hub.constants")

COMMIT = "a" * 40
COMMIT_V1 = "b" * 40


def add_snapshot(cache: Path, repo_id: str, folder: Path, commit: str, refs=("main",)) -> Path:
    """Lay ``folder`` out as huggingface_hub does: content-addressed blobs, a snapshot of relative symlinks."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snap = storage / "snapshots" / commit
    for src in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = src.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        dst = snap / src.relative_to(folder)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(os.path.relpath(blob, dst.parent))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (storage / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A hub cache holding ``org/tiny`` at main (seed 0) and at tag v1 (seed 1), and the local roots."""
    base = tmp_path_factory.mktemp("hub")
    main_root = write_tiny_root(base / "main_root", with_vae=False, seed=0)
    v1_root = write_tiny_root(base / "v1_root", with_vae=False, seed=1)
    cache = base / "cache"
    add_snapshot(cache, "org/tiny", main_root, COMMIT)
    add_snapshot(cache, "org/tiny", v1_root, COMMIT_V1, refs=("v1",))
    return SimpleNamespace(dir=cache, main=main_root, v1=v1_root)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def unreachable(monkeypatch):
    """Online mode against a hub that refuses connections (a closed local port): no traffic leaves."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:9")


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_offline_id_loads_from_the_cache(cache, offline):
    engine = ue.Engine.from_pretrained("org/tiny", cache_dir=cache.dir, device="cpu")
    assert _same_weights(engine.model, ue.Engine.from_pretrained(cache.main, device="cpu").model)
    assert engine.tokenizer is not None
    path = resolve_root("org/tiny", cache_dir=cache.dir)
    assert path == cache.dir / "models--org--tiny" / "snapshots" / COMMIT


def test_revisions_tags_and_commits(cache, offline):
    v1 = ue.Engine.from_pretrained(cache.v1, device="cpu").model
    for revision in ("v1", COMMIT_V1):
        engine = ue.Engine.from_pretrained("org/tiny", revision=revision, cache_dir=cache.dir, device="cpu")
        assert _same_weights(engine.model, v1)
    assert not _same_weights(v1, ue.Engine.from_pretrained(cache.main, device="cpu").model)


def test_pipeline_takes_ids_and_diffusers_keywords(cache, offline):
    pipe = ue.URSAPipeline.from_pretrained("org/tiny", cache_dir=str(cache.dir), revision="v1", device="cpu",
                                           local_files_only=True, use_auth_token=None)
    assert _same_weights(pipe.transformer, ue.Engine.from_pretrained(cache.v1, device="cpu").model)
    with pytest.raises(HubError, match=r"^pretrained_model_name_or_path: org/nope "):
        ue.URSAPipeline.from_pretrained("org/nope", cache_dir=str(cache.dir))


def test_missing_id_and_revision_offline(cache, offline):
    with pytest.raises(HubError) as err:
        ue.Engine.from_pretrained("org/nope", cache_dir=cache.dir)
    msg = str(err.value)
    for part in ("root: org/nope (revision main)", f"hub cache {cache.dir}", "offline",
                 f"`hf download org/nope --cache-dir {cache.dir}`"):
        assert part in msg, msg
    with pytest.raises(HubError) as err:
        resolve_root("org/tiny", revision="v9", cache_dir=cache.dir)
    msg = str(err.value)
    assert "org/tiny (revision v9)" in msg and "--revision v9" in msg and str(cache.dir) in msg
    assert isinstance(err.value, FileNotFoundError)


def test_incomplete_snapshot_is_named(cache, offline, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(cache.main, partial)
    shutil.rmtree(partial / "scheduler")
    add_snapshot(tmp_path / "c", "org/partial", partial, COMMIT)
    with pytest.raises(HubError, match=r"has no scheduler/scheduler_config.json .*hf download org/partial"):
        resolve_root("org/partial", cache_dir=tmp_path / "c")


def test_unreachable_hub_falls_back_to_the_cache(cache, unreachable):
    assert resolve_root("org/tiny", cache_dir=cache.dir) == cache.dir / "models--org--tiny" / "snapshots" / COMMIT
    with pytest.raises(HubError) as err:
        resolve_root("org/nope", cache_dir=cache.dir)
    assert "the hub cannot be reached (Connect" in str(err.value)
    assert "hf download org/nope" in str(err.value)


def test_local_folder_wins_and_non_ids_are_named(cache, offline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(cache.v1, tmp_path / "org" / "tiny")  # a relative folder that looks like an id
    assert resolve_root("org/tiny", cache_dir=cache.dir) == Path("org/tiny")
    with pytest.raises(HubError, match="neither a local folder nor a hub id"):
        resolve_root("./missing/folder/x")
    assert not hub.is_hub_id("/abs/path") and not hub.is_hub_id("a/b/c") and hub.is_hub_id("BAAI/URSA-1.7B-FSQ320")


def test_without_huggingface_hub_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(HubError, match=r"needs huggingface_hub \(pip install 'ursa-engine\[hub\]'\)"):
        resolve_root("org/not-local")


# ---------------------------------------------------------------------------- what is downloaded
REPO = [
    "README.md", ".gitattributes", "model_index.json", "assets/teaser.mp4",
    "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors.index.json",
    "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
    "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
    "transformer/diffusion_pytorch_model.fp16.safetensors", "transformer/diffusion_pytorch_model.bin",
    "scheduler/scheduler_config.json", "scheduler/scheduler_model.pth",
    "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
]
BASE = ["transformer/config.json", "scheduler/scheduler_config.json", "scheduler/scheduler_model.pth",
        "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "vae/config.json"]


def test_root_files_are_the_files_a_load_reads():
    shards = ["transformer/diffusion_pytorch_model.safetensors.index.json",
              "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
              "transformer/diffusion_pytorch_model-00002-of-00002.safetensors"]
    assert sorted(root_files(REPO)) == sorted(BASE + shards + ["vae/diffusion_pytorch_model.safetensors"])
    assert sorted(root_files(REPO, variant="fp16")) == sorted(
        BASE + ["transformer/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors"])
    assert sorted(root_files(REPO, weights=False)) == sorted(BASE)  # ursa-engine plan: configs and codebook
    assert sorted(root_files(REPO, transformer_weights=False)) == sorted(BASE + ["vae/diffusion_pytorch_model"
                                                                                 ".safetensors"])
    bin_only = [f for f in REPO if not f.startswith("transformer/diffusion_pytorch_model") or f.endswith(".bin")]
    assert "transformer/diffusion_pytorch_model.bin" in root_files(bin_only)


def test_online_download_is_limited_to_those_files(cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    calls = []

    def model_info(self, repo_id, revision=None, **kw):
        calls.append(("info", repo_id, revision))
        return SimpleNamespace(siblings=[SimpleNamespace(rfilename=f) for f in REPO], sha=COMMIT)

    def snapshot_download(repo_id, **kw):
        calls.append(("download", repo_id, kw))
        return str(cache.main)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert resolve_root("org/tiny", revision="v1", cache_dir=cache.dir, token="hf_x") == cache.main
    (_, repo, revision), (_, repo2, kw) = calls
    assert repo == repo2 == "org/tiny" and revision == "v1" and kw["revision"] == "v1" and kw["token"] == "hf_x"
    assert sorted(kw["allow_patterns"]) == sorted(root_files(REPO))
    assert kw["cache_dir"] == os.fspath(cache.dir)
    calls.clear()
    ue.Engine.from_pretrained("org/tiny", device="cpu", cache_dir=cache.dir,
                              transformer_weights=cache.main / "transformer")  # an overlay: no base weights
    assert not any(f.startswith("transformer/diffusion") for f in calls[-1][2]["allow_patterns"])


def _raiser(cls):
    def model_info(self, repo_id, revision=None, **kw):
        err = cls.__new__(cls)  # the hub's errors want an HTTP response; only the type matters here
        err.args = ("404 Client Error",)
        raise err
    return model_info


def test_online_missing_repo_and_revision(cache, monkeypatch):
    from huggingface_hub.utils import RepositoryNotFoundError, RevisionNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", _raiser(RepositoryNotFoundError))
    with pytest.raises(HubError, match=r"^root: org/nope is not a local folder and no hub repository org/nope "
                                       r"can be read .*hf auth login"):
        resolve_root("org/nope", cache_dir=cache.dir)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", _raiser(RevisionNotFoundError))
    with pytest.raises(HubError, match=r"^root: org/tiny has no revision 'v9' on the hub .*hf download org/tiny"):
        resolve_root("org/tiny", revision="v9", cache_dir=cache.dir)


# ---------------------------------------------------------------------------- the command line
def test_cli_generate_and_plan_take_ids(cache, offline, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(cache.dir))
    monkeypatch.chdir(tmp_path)
    argv = ["--prompt", "a bear", "--latents-shape", "1", "2", "3", "--steps", "2", "--device", "cpu",
            "--prompt-length", "8", "--no-progress"]
    assert main(["generate", "org/tiny", "--revision", "v1", *argv, "--out", "hub.pt"]) == 0
    assert main(["generate", str(cache.v1), *argv, "--out", "local.pt"]) == 0
    hub_t, local_t = (torch.load(tmp_path / f, weights_only=True) for f in ("hub.pt", "local.pt"))
    assert torch.equal(hub_t, local_t)
    capsys.readouterr()
    assert main(["generate", "org/nope", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ursa-engine: error: ROOT: org/nope (revision main) is not in the hub cache") and \
        "hf download org/nope" in err and len(err.splitlines()) == 1
    assert main(["generate", str(cache.v1), "--revision", "v1", *argv]) == 2
    assert "--revision: " in capsys.readouterr().err
    assert main(["plan", "--root", "org/tiny", "--latents-shape", "2", "3", "--no-decode", "--json"]) == 0
    capsys.readouterr()
    assert main(["plan", "--root", "org/nope"]) == 2
    assert "ursa-engine: error: --root: org/nope (revision main)" in capsys.readouterr().err


def test_serve_takes_ids_and_overlays(cache, offline, monkeypatch, capsys):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from types import SimpleNamespace

    from ursa_engine.serve import app as app_mod

    started = []
    monkeypatch.setattr(app_mod, "draining_server",  # the server object serve() runs: record its app, run nothing
                        lambda config, batcher, drain_seconds: SimpleNamespace(run=lambda: started.append(config.app)))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache.dir))
    served = []
    original = app_mod.create_app
    monkeypatch.setattr(app_mod, "create_app",
                        lambda model, *args, **kw: served.append(model) or original(model, *args, **kw))
    app_mod.serve("org/tiny", revision="v1", device="cpu")
    app_mod.serve("org/tiny", device="cpu", transformer_weights=cache.v1 / "transformer")
    assert len(started) == 2 and [m.name for m in served] == ["org/tiny", "org/tiny"]
    v1 = ue.Engine.from_pretrained(cache.v1, device="cpu").model
    assert _same_weights(served[0].engine.model, v1) and _same_weights(served[1].engine.model, v1)
    assert main(["serve", "org/nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ursa-engine: error: ROOT: org/nope (revision main) is not in the hub cache"), err


def test_revision_with_a_local_folder_is_refused(cache):
    with pytest.raises(HubError, match="revision: applies to hub ids only"):
        resolve_root(cache.main, revision="v9")


def test_snapshot_cached_without_weights_is_named_offline(cache, offline, tmp_path):
    """A configs-only snapshot (what `plan --root ID` fetches) cannot serve a full load: the error says how."""
    configs = tmp_path / "configs"
    shutil.copytree(cache.main, configs)
    for f in (configs / "transformer").glob("*.safetensors"):
        f.unlink()
    add_snapshot(tmp_path / "c", "org/configs", configs, COMMIT)
    assert resolve_root("org/configs", cache_dir=tmp_path / "c", weights=False)  # enough for a plan
    with pytest.raises(HubError, match=r"no transformer/ weights .*hf download org/configs"):
        resolve_root("org/configs", cache_dir=tmp_path / "c")
