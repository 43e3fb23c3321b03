"""Flow matching: closed forms against NumPy, the shifted grids and Euler steps against diffusers'
``FlowMatchEulerDiscreteScheduler``, training times, the teacher's flow loss inputs, the Euler sampler."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax import diffusion, flow_matching
from codi_jax.objectives import teacher
from codi_jax.sampling import samplers

RNG = np.random.RandomState(0)


def _arrays(*shape, n=2, seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randn(*shape).astype(np.float32) for _ in range(n)]


def test_path_velocity_and_recovery_match_numpy() -> None:
    x0, eps = _arrays(3, 4, 4, 2)
    t = np.array([0.0, 0.3, 1.0], np.float32)
    tb = t[:, None, None, None]
    x_t = np.asarray(flow_matching.interpolate(x0, eps, t))
    np.testing.assert_allclose(x_t, (1 - tb) * x0 + tb * eps, rtol=1e-6, atol=1e-6)
    v = np.asarray(flow_matching.velocity(x0, eps))
    np.testing.assert_array_equal(v, eps - x0)
    x0_hat, eps_hat = flow_matching.x0_eps_from_velocity(x_t, v, t)
    np.testing.assert_allclose(x0_hat, x0, atol=2e-6)
    np.testing.assert_allclose(eps_hat, eps, atol=2e-6)
    # An Euler step with the true velocity stays on the straight path: x_s exactly.
    s = np.float32(0.1)
    moved = flow_matching.euler_step(x_t, v, t, s)
    np.testing.assert_allclose(moved, (1 - s) * x0 + s * eps, atol=2e-6)


def test_time_shifts_match_their_closed_forms() -> None:
    t = np.linspace(0.01, 1.0, 50)
    for shift in (1.0, 3.0, 0.5):
        np.testing.assert_allclose(flow_matching.time_shift(t, shift), shift * t / (1 + (shift - 1) * t), rtol=1e-12)
    np.testing.assert_array_equal(flow_matching.time_shift(t, 1.0), t)
    mu = 0.8
    expected = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    np.testing.assert_allclose(flow_matching.exponential_time_shift(t, mu), expected, rtol=1e-12)
    # sigma = 1: the static shift by exp(mu).
    np.testing.assert_allclose(flow_matching.exponential_time_shift(t, mu), flow_matching.time_shift(t, math.exp(mu)))
    m = (1.15 - 0.5) / (4096 - 256)
    assert flow_matching.resolution_mu(1024) == pytest.approx(1024 * m + 0.5 - m * 256, rel=1e-12)
    assert flow_matching.resolution_mu(256) == pytest.approx(0.5) and flow_matching.resolution_mu(
        4096
    ) == pytest.approx(1.15)


# ---------------------------------------------------------------- against diffusers


def _scheduler(**kwargs):
    pytest.importorskip("torch")
    schedulers = pytest.importorskip("diffusers.schedulers")
    return schedulers.FlowMatchEulerDiscreteScheduler(**kwargs)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("num_steps", [1, 4, 28, 50])
def test_euler_times_match_diffusers_set_timesteps(shift: float, num_steps: int) -> None:
    scheduler = _scheduler(shift=shift)
    scheduler.set_timesteps(num_steps)
    times = flow_matching.euler_times(num_steps, shift)
    assert times.dtype == np.float32 and times.shape == (num_steps + 1,)
    np.testing.assert_allclose(times, scheduler.sigmas.numpy(), rtol=1e-6, atol=0)
    # What the transformer is fed: the scheduler's timesteps, 1000 sigma.
    model_t = np.asarray(flow_matching.FlowSchedule(shift=shift).model_time(times[:-1]))
    np.testing.assert_allclose(model_t, scheduler.timesteps.numpy(), rtol=1e-6)


@pytest.mark.parametrize("image_seq_len", [256, 1024, 4096])
def test_resolution_dependent_times_match_diffusers(image_seq_len: int) -> None:
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = _scheduler(shift=3.0, use_dynamic_shifting=True)
    mu = calculate_shift(image_seq_len)
    assert flow_matching.resolution_mu(image_seq_len) == pytest.approx(mu, rel=1e-12)
    scheduler.set_timesteps(20, mu=mu)
    times = flow_matching.euler_times(20, mu=flow_matching.resolution_mu(image_seq_len))
    np.testing.assert_allclose(times, scheduler.sigmas.numpy(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_steps_match_diffusers_step(shift: float) -> None:
    """Every step of a 6-step run on random samples and model outputs (NCHW there, NHWC here)."""
    import torch

    scheduler = _scheduler(shift=shift)
    scheduler.set_timesteps(6)
    times = flow_matching.euler_times(6, shift)
    sample = RNG.randn(2, 3, 4, 4).astype(np.float32)
    ours = jnp.asarray(sample.transpose(0, 2, 3, 1))
    for i, timestep in enumerate(scheduler.timesteps):
        output = RNG.randn(2, 3, 4, 4).astype(np.float32)
        expected = scheduler.step(torch.from_numpy(output), timestep, torch.from_numpy(sample)).prev_sample.numpy()
        ours = flow_matching.euler_step(ours, jnp.asarray(output.transpose(0, 2, 3, 1)), times[i], times[i + 1])
        np.testing.assert_allclose(np.asarray(ours), expected.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-6)
        sample = expected


def test_interpolation_matches_diffusers_scale_noise() -> None:
    import torch

    scheduler = _scheduler(shift=3.0)
    scheduler.set_timesteps(10)
    x0, eps = _arrays(2, 3, 4, 4, seed=1)
    timestep = scheduler.timesteps[3]
    expected = scheduler.scale_noise(torch.from_numpy(x0), timestep[None], torch.from_numpy(eps)).numpy()
    t = float(scheduler.sigmas[3])
    np.testing.assert_allclose(flow_matching.interpolate(jnp.asarray(x0), jnp.asarray(eps), t), expected, atol=1e-6)


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("sampling", flow_matching.TIME_SAMPLINGS)
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_training_times_are_the_shifted_draws(sampling: str, shift: float) -> None:
    schedule = flow_matching.FlowSchedule(shift=shift, time_sampling=sampling, logit_mean=0.3, logit_std=0.7)
    rng = jax.random.PRNGKey(4)
    t = np.asarray(schedule.sample_train_time(rng, (4096,)), np.float64)
    if sampling == "logit_normal":
        u = 1 / (1 + np.exp(-(0.3 + 0.7 * np.asarray(jax.random.normal(rng, (4096,)), np.float64))))
    else:
        u = 1 - np.asarray(jax.random.uniform(rng, (4096,)), np.float64)
    np.testing.assert_allclose(t, shift * u / (1 + (shift - 1) * u), rtol=2e-6, atol=1e-7)
    assert t.min() > 0 and t.max() <= 1
    if sampling == "logit_normal" and shift == 1.0:  # logit(t) ~ N(0.3, 0.7^2)
        logit = np.log(t / (1 - t))
        assert abs(logit.mean() - 0.3) < 0.05 and abs(logit.std() - 0.7) < 0.05


def test_teacher_flow_example_is_the_path_and_its_velocity() -> None:
    """The teacher loss regresses ``v_theta(x_t, 1000 t)`` on ``eps - x_0`` at ``x_t = (1-t) x_0 + t eps``."""
    schedule = flow_matching.FlowSchedule(shift=2.0)
    x0 = jnp.asarray(_arrays(3, 4, 4, 3, n=1, seed=2)[0])
    rng = jax.random.PRNGKey(7)
    t, x_t, target, _ = teacher.noised_example(schedule, x0, rng, "v")
    rng_t, rng_eps, _ = jax.random.split(rng, 3)
    eps = np.asarray(jax.random.normal(rng_eps, x0.shape, jnp.float32))
    np.testing.assert_array_equal(np.asarray(t), np.asarray(schedule.sample_train_time(rng_t, (3,))))
    tb = np.asarray(t)[:, None, None, None]
    np.testing.assert_allclose(x_t, (1 - tb) * np.asarray(x0) + tb * eps, atol=1e-6)
    np.testing.assert_allclose(target, eps - np.asarray(x0), atol=1e-6)

    def apply(params, x, model_t):  # a stand-in network: v = params * x + model_t / 1000
        return params * x + model_t[:, None, None, None] / 1000.0

    class Model:
        def apply(self, variables, x, model_t, **_):
            return apply(variables["params"], x, model_t)

    loss = teacher.diffusion_loss(jnp.float32(0.5), Model(), schedule, x0, rng, "v")
    expected = np.mean(np.square(0.5 * np.asarray(x_t) + tb - (eps - np.asarray(x0))))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


# ---------------------------------------------------------------- sampling


def test_euler_sampler_solves_the_gaussian_flow_ode() -> None:
    """Data ~ N(0, s^2): the exact velocity is ``E[eps - x_0 | x_t] = x_t (t - (1 - t) s^2) / var_t``
    with ``var_t = (1 - t)^2 s^2 + t^2``; the ODE carries noise z at t = 1 to ``s z``. Euler on the
    shifted grid converges to it (first order: error ~ 1 / steps)."""
    s = 0.5
    schedule = flow_matching.FlowSchedule(shift=3.0)

    def exact_velocity(_, x, model_t):
        t = (model_t / 1000.0)[:, None, None, None]
        return x * (t - (1 - t) * s**2) / ((1 - t) ** 2 * s**2 + t**2)

    z = jnp.asarray(_arrays(2, 4, 4, 3, n=1, seed=3)[0])
    errors = []
    for steps in (25, 100, 400):
        times = schedule.sampling_times(steps)
        out = samplers.euler_sample(exact_velocity, None, z, times, schedule)
        errors.append(float(jnp.max(jnp.abs(out - s * z))))
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]  # 4x the steps, a quarter of the error
    assert all(3.5 < r < 4.5 for r in ratios) and errors[2] < 0.02, errors


def test_one_euler_step_with_the_true_velocity_returns_the_data() -> None:
    x0, eps = (jnp.asarray(a) for a in _arrays(2, 4, 4, 3, seed=5))
    out = samplers.euler_sample(
        lambda *_: eps - x0, None, eps, np.array([1.0, 0.0], np.float32), flow_matching.FlowSchedule()
    )
    np.testing.assert_allclose(out, x0, atol=1e-6)


def test_many_step_sampler_routes_flow_to_euler_and_vp_to_ddim() -> None:
    apply = lambda params, x, model_t: params * x  # noqa: E731
    flow = samplers.many_step_sampler(apply, flow_matching.FlowSchedule(shift=3.0), "v", 4, clip_denoised=False)
    assert flow.func is samplers.euler_sample
    np.testing.assert_array_equal(flow.keywords["times"], flow_matching.euler_times(4, 3.0))
    vp = samplers.many_step_sampler(apply, diffusion.Schedule(), "v", 4)
    assert vp.func is samplers.ddim_sample
    np.testing.assert_array_equal(vp.keywords["times"], samplers.uniform_times(4))


def test_schedule_config_builds_either_kind_and_refuses_bad_fields() -> None:
    flow = diffusion.schedule_from_config({"kind": "flow", "shift": 3.0, "time_sampling": "uniform"})
    assert flow == flow_matching.FlowSchedule(shift=3.0, time_sampling="uniform")
    assert diffusion.schedule_from_config({"kind": "cosine"}) == diffusion.Schedule()
    with pytest.raises(ValueError, match=r"^Unknown schedule config fields \['beta_start'\]"):
        diffusion.schedule_from_config({"kind": "flow", "beta_start": 0.1})
    with pytest.raises(ValueError, match=r"^schedule.time_sampling='mode'; valid values"):
        diffusion.schedule_from_config({"kind": "flow", "time_sampling": "mode"})
    with pytest.raises(ValueError, match=r"^schedule.shift=0.0: must be a finite number > 0"):
        diffusion.schedule_from_config({"kind": "flow", "shift": 0.0})
    with pytest.raises(ValueError, match="flow"):
        diffusion.schedule_from_config({"kind": "rectified"})
