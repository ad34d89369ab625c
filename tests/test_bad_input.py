"""Bad input raises a clear error naming the argument, and writes nothing (DESIGN §7)."""

import pytest
import torch

import ursa_engine as ue


class NotATensor:
    """An arbitrary object: a weights-only load must refuse to unpickle it."""


@pytest.fixture
def sched():
    return ue.Scheduler(ue.MetricPath(ue.Codebook.fsq((3, 3)), alpha=1.0, c=5.0), 10)


def _inputs(K=9, S=(2, 5)):
    return torch.randn(*S, K), torch.randint(0, K, S)


@pytest.mark.parametrize("mutate, match", [
    (lambda z, x: (z, x + 9), r"x: ids must be in \[0, 9\)"),
    (lambda z, x: (z, x - 10), r"x: ids must be in"),
    (lambda z, x: (z.index_fill(-1, torch.tensor([2]), float("nan")), x), "logits: contains NaN"),
    (lambda z, x: (z[..., :8], x), "logits: last dim 8 but the codebook has K=9"),
    (lambda z, x: (z[:1], x), r"logits: shape \(1, 5, 9\) does not match tokens \(2, 5\)"),
    (lambda z, x: (z.to(torch.int32), x), "logits: expected float32/float16/bfloat16"),
    (lambda z, x: (z, x.float()), "x: expected an integer tensor"),
    (lambda z, x: (z.to("meta"), x), "logits: on meta"),
    (lambda z, x: (z.index_fill(-1, torch.tensor([1]), float("inf")), x), r"logits: contains \+inf"),
    (lambda z, x: (torch.full_like(z, -float("inf")), x), "logits: a token has every logit at -inf"),
])
@pytest.mark.parametrize("which", ["torch", "auto"])  # auto: a fused backend's error bits where one runs
def test_step_rejects_bad_tensors(sched, mutate, match, which):
    z, x = mutate(*_inputs())
    out = torch.full((2, 5), -1, dtype=torch.int64)
    with pytest.raises((ValueError, TypeError), match=match):
        sched.step(z, 3, x, out=out, backend=which)
    assert (out == -1).all(), "nothing may be written on error"


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=0.0), "temperature: must be a positive"),
    (dict(guidance_scale=float("nan")), "guidance_scale: must be a finite"),
    (dict(top_k=-1), "top_k: must be an int >= 0"),
    (dict(top_p=0.0), r"top_p: must be in \(0, 1\]"),
    (dict(seed=-3), r"seed: must be in \[0, 2\^63\)"),
    (dict(seed=1.5), "seed: expected an int"),
    (dict(seed=torch.tensor([1, 2, 3])), r"seed: one seed per sample needs shape \(2,\)"),
    (dict(backend="cuda"), "backend: expected 'auto' or one of"),
    (dict(uncond_logits=torch.randn(2, 5, 9, dtype=torch.float64)), "uncond_logits: dtype"),
])
def test_step_rejects_bad_options(sched, kwargs, match):
    z, x = _inputs()
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        sched.step(z, 3, x, **kwargs)


def test_step_rejects_bad_x1_and_token_offset():
    sched = ue.Scheduler(ue.MetricPath(ue.Codebook.fsq((3, 3))), 10)
    z, x = torch.randn(2, 5, 9), torch.randint(0, 9, (2, 5))
    with pytest.raises(ValueError, match="token_offset: must be an int"):
        sched.step(z, 3, x, token_offset=-1)
    with pytest.raises(ValueError, match=r"x1: shape \(5,\) does not match tokens \(2, 5\)"):
        sched.step(None, 3, x, x1=torch.zeros(5, dtype=torch.int64))
    with pytest.raises(TypeError, match="logits: expected a float tensor"):
        sched.step(None, 3, x)
    out = torch.full((2, 5), -1, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"x1: ids must be in \[0, 9\), found values in \[9, 9\]"):
        sched.step(None, 3, x, x1=torch.full_like(x, 9), out=out, backend="torch")
    assert (out == -1).all()
    conf = ue.Scheduler(ue.MaskPath(9, 8), 4, mask_sampler="confidence")
    with pytest.raises(ValueError, match="x1: the confidence sampler"):
        conf.step(z, 1, x, x1=x)


@pytest.mark.parametrize("k", [-1, 10, 2.0, True])
def test_step_rejects_bad_step_index(sched, k):
    z, x = _inputs()
    with pytest.raises(ValueError, match="k: must be an int in"):
        sched.step(z, k, x)


@pytest.mark.parametrize("t, match", [
    (1.5, r"t: times must lie in \[0, 1\]"),
    (-0.1, r"t: times must lie in \[0, 1\]"),
    (float("nan"), r"t: times must lie in \[0, 1\]"),
    (torch.rand(3), r"t: shape \(3,\) matches neither the leading axes"),
    ("0.5", "t: expected a float or a tensor"),
])
def test_path_sample_rejects_bad_times(t, match):
    path = ue.MetricPath(ue.Codebook.fsq((3, 3)))
    with pytest.raises((ValueError, TypeError), match=match):
        path.sample(torch.zeros(2, 4, dtype=torch.int64), t)


def test_path_sample_rejects_ids_outside_codebook():
    for path in (ue.MetricPath(ue.Codebook.fsq((3, 3))), ue.MixturePath(9), ue.MaskPath(9, 8)):
        with pytest.raises(ValueError, match=r"x1: ids must be in \[0, 9\)"):
            path.sample(torch.tensor([0, 9]), 0.5)


@pytest.mark.parametrize("build, match", [
    (lambda: ue.Codebook(torch.randn(5)), r"emb: expected shape \(K, m\)"),
    (lambda: ue.Codebook(torch.tensor([[1.0, float("nan")], [0.0, 1.0]])), "emb: contains NaN"),
    (lambda: ue.Codebook(torch.ones(4, 2, dtype=torch.int64)), "emb: expected a float tensor"),
    (lambda: ue.Codebook.fsq((8, 1)), "levels: every level must be >= 2"),
    (lambda: ue.MetricPath(torch.randn(4, 2)), "codebook: expected a ue.Codebook"),
    (lambda: ue.MetricPath(ue.Codebook.fsq((3,)), alpha=-1.0), "alpha: must be a positive"),
    (lambda: ue.MetricPath(ue.Codebook.fsq((3,)), power=3), "power: must be 2 or 4"),
    (lambda: ue.MixturePath(1), "K: must be an int >= 2"),
    (lambda: ue.MixturePath(5, "sigmoid"), "schedule: expected one of"),
    (lambda: ue.MaskPath(5, 5), r"mask_id: must be an int in \[0, 5\)"),
    (lambda: ue.Scheduler(ue.MixturePath(5), 0), "num_steps: must be an int >= 1"),
    (lambda: ue.Scheduler(ue.MixturePath(5), 4, shift=0.0), "shift: must be a positive"),
    (lambda: ue.Scheduler(ue.MixturePath(5), 4, mask_sampler="confidence"), "mask_sampler: 'confidence' needs"),
])
def test_constructors_reject_bad_arguments(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


def test_codebook_from_pretrained_rejects_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="path: .* holds neither scheduler_model.pth"):
        ue.Codebook.from_pretrained(tmp_path)
    torch.save({"other": torch.zeros(3, 2)}, tmp_path / "scheduler_model.pth")
    with pytest.raises(KeyError, match="has no 'path.emb' entry"):
        ue.Codebook.from_pretrained(tmp_path)

    torch.save({"path.emb": NotATensor()}, tmp_path / "scheduler_model.pth")
    with pytest.raises(ValueError, match="is not a tensors-only torch file"):
        ue.Codebook.from_pretrained(tmp_path)


def test_codebook_loads_pth_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    emb = torch.randn(12, 4)
    torch.save({"path.emb": emb}, tmp_path / "scheduler_model.pth")
    assert torch.equal(ue.Codebook.from_pretrained(tmp_path).emb, emb)
    save_file({"path.emb": emb}, str(tmp_path / "codes.safetensors"))
    assert torch.equal(ue.Codebook.from_pretrained(tmp_path / "codes.safetensors").emb, emb)


def test_confidence_sampler_refuses_other_backends():
    sched = ue.Scheduler(ue.MaskPath(5, 4), 3, mask_sampler="confidence")
    with pytest.raises(RuntimeError, match="backend='native' cannot run the confidence sampler"):
        sched.step(torch.randn(1, 6, 5), 0, torch.full((1, 6), 4), backend="native")


def test_step_probs_rejects_unknown_options(sched):
    z, x = _inputs()
    with pytest.raises(TypeError, match="guidance_scal"):
        sched.step_probs(z, 3, x, guidance_scal=2.0)


def test_explicit_fsq_table_is_recognised_and_other_tables_are_not():
    fsq = ue.Codebook.fsq((8, 8, 8, 5, 5, 5))
    assert ue.Codebook(fsq.emb.clone()).levels == (8, 8, 8, 5, 5, 5)
    shuffled = fsq.emb[torch.randperm(fsq.size, generator=torch.Generator().manual_seed(0))]
    assert ue.Codebook(shuffled).levels is None
    assert ue.Codebook(torch.randn(60, 3)).levels is None
