"""`ue.compat.KineticOptimalScheduler` follows DESIGN §2.4 through URSA's own method names."""

import json

import pytest
import torch
from test_sampler_laws import N_REP, assert_follows  # same bounds as the native API's tests

import ursa_engine as ue
from ursa_engine.compat import KineticOptimalScheduler


@pytest.fixture
def folder(tmp_path):
    g = torch.Generator().manual_seed(0)
    torch.save({"path.emb": torch.randn(7, 3, generator=g)}, tmp_path / "scheduler_model.pth")
    (tmp_path / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "KineticOptimalScheduler", "alpha": 1.0, "c": 3.0, "shift": 2.0}))
    return tmp_path


def test_from_pretrained_reads_config_and_codebook(folder):
    s = KineticOptimalScheduler.from_pretrained(folder)
    assert (s.alpha, s.c, s.shift, s.codebook_size) == (1.0, 3.0, 2.0, 7)
    assert isinstance(s.path, ue.MetricPath)
    assert KineticOptimalScheduler(shift=5.0).load_pretrained(folder).shift == 5.0  # user shift wins


def test_missing_alpha_means_mixture_path(folder):
    (folder / "scheduler_config.json").write_text(json.dumps({"shift": 1.0}))
    s = KineticOptimalScheduler.from_pretrained(folder)
    assert isinstance(s.path, ue.MixturePath) and "alpha" not in repr(s)


def test_timestep_to_t_is_the_shifted_grid(folder):
    s = KineticOptimalScheduler.from_pretrained(folder)
    s.set_timesteps(10)
    assert s.timesteps == list(range(10))
    for k in range(10):
        u = k / 10
        assert s.timestep_to_t(k) == pytest.approx(u / (u + 2.0 * (1 - u)), abs=1e-12)


def test_step_follows_exact_law_including_last_step(folder):
    s = KineticOptimalScheduler.from_pretrained(folder)
    s.set_timesteps(6)
    ref = ue.Scheduler(s.path, 6, shift=2.0)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 7, generator=g) * 2
    x = torch.tensor([0, 3, 6])
    for k in (3, 5):
        gen = torch.Generator().manual_seed(k)
        new = s.step(logits[:, None].expand(3, N_REP, 7), k, x[:, None].expand(3, N_REP), generator=gen).prev_sample
        assert_follows(new, ref.step_probs(logits, k, x))


def test_add_noise_follows_path_law_with_per_sample_times(folder):
    s = KineticOptimalScheduler.from_pretrained(folder)
    x1 = torch.tensor([1, 4, 6])
    t = torch.tensor([0.2, 0.5, 0.8])
    xt = s.add_noise(x1[:, None].expand(3, N_REP), t, generator=torch.Generator().manual_seed(1))
    assert_follows(xt, s.path.probs(x1, t))


def test_generator_makes_runs_reproducible(folder):
    s = KineticOptimalScheduler.from_pretrained(folder)
    s.set_timesteps(5)
    z, x = torch.randn(2, 50, 7), torch.randint(0, 7, (2, 50))
    a = s.step(z, 2, x, generator=torch.Generator().manual_seed(4)).prev_sample
    b = s.step(z, 2, x, generator=torch.Generator().manual_seed(4), return_dict=False)[0]
    assert torch.equal(a, b)
    t1 = s.sample_timesteps((4, 3), generator=torch.Generator().manual_seed(2))
    t2 = s.sample_timesteps((4, 3), generator=torch.Generator().manual_seed(2))
    assert torch.equal(t1, t2) and (t1 < 1).all() and (t1 >= 0).all()


def test_prev_sample_fixes_the_prediction(folder):
    s = KineticOptimalScheduler.from_pretrained(folder)
    s.set_timesteps(4)
    z, x = torch.randn(40, 7), torch.randint(0, 7, (40,))
    target = torch.randint(0, 7, (40,))
    assert torch.equal(s.step(z, 3, x, prev_sample=target).prev_sample, target)


def test_step_before_set_timesteps_is_a_clear_error(folder):
    s = KineticOptimalScheduler.from_pretrained(folder)
    with pytest.raises(RuntimeError, match="call set_timesteps"):
        s.step(torch.randn(2, 7), 0, torch.zeros(2, dtype=torch.int64))


def test_drop_in_call_forms_of_ursas_pipeline(folder):
    """URSA's pipeline indexes the output, passes the generator fourth, sets timesteps first."""
    s = KineticOptimalScheduler()
    s.set_timesteps(4)
    assert s.timestep_to_t(2) == pytest.approx(0.5)  # the grid needs no codebook
    s = KineticOptimalScheduler.from_pretrained(folder, shift=1.0)
    assert s.shift == 1.0  # a user shift of exactly 1 still overrides the config's 2.0
    s.set_timesteps(4)
    z, x = torch.randn(3, 7), torch.zeros(3, dtype=torch.long)
    a = s.step(z, 1, x, torch.Generator().manual_seed(0))[0]
    b = s.step(z, 1, x, generator=torch.Generator().manual_seed(0)).prev_sample
    assert torch.equal(a, b)
    s.set_shift(3.0)
    assert s.timestep_to_t(2) == pytest.approx(0.5 / (0.5 + 3.0 * 0.5))


def test_errors_use_ursas_argument_names(folder):
    s = KineticOptimalScheduler.from_pretrained(folder)
    s.set_timesteps(4)
    with pytest.raises(ValueError, match=r"sample: ids must be in \[0, 7\)"):
        s.step(torch.randn(2, 7), 0, torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="model_output: last dim 6"):
        s.step(torch.randn(2, 6), 0, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"timesteps: times must lie in \[0, 1\]"):
        s.add_noise(torch.tensor([0, 1]), 2.0)
    with pytest.raises(ValueError, match=r"prev_sample: ids must be in \[0, 7\)"):
        s.step(torch.randn(2, 7), 1, torch.tensor([0, 1]), prev_sample=torch.tensor([9, 0]))
