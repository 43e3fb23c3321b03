"""Schedules, parametrizations, forward process, DDIM step and sampling grid (codi_jax.diffusion).

Closed forms are recomputed here independently (numpy float64); diffusers is a test-only
reference for the scheduler and the sinusoidal time embedding (skipped when not installed).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax import diffusion
from codi_jax.models.layers import timestep_embedding

T = 1000
COSINE = diffusion.Schedule("cosine")
SCALED_LINEAR = diffusion.Schedule("scaled_linear")
SCHEDULES = {"cosine": COSINE, "scaled_linear": SCALED_LINEAR}
TIME_GRID = np.linspace(0.0, 1.0, 201, dtype=np.float32)


def _reference_alphas_cumprod() -> np.ndarray:
    """SD's scaled_linear alpha_bar (float64), computed here without the module under test."""
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def _random(shape: tuple[int, ...], seed: int) -> jax.Array:
    return jnp.asarray(np.random.RandomState(seed).randn(*shape).astype(np.float32))


# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_variance_preserving(kind: str) -> None:
    alpha, sigma = SCHEDULES[kind].alpha_sigma(TIME_GRID)
    np.testing.assert_allclose(np.asarray(alpha) ** 2 + np.asarray(sigma) ** 2, 1.0, atol=2e-6)
    assert np.all(np.asarray(alpha) > 0)


def test_cosine_matches_closed_form_and_is_monotone() -> None:
    logsnr_min, logsnr_max = COSINE.logsnr_min, COSINE.logsnr_max
    # logsnr = -2 log tan(angle): angle(0) from logsnr_max, angle(1) from logsnr_min.
    b = math.atan(math.exp(-0.5 * logsnr_max))
    a = math.atan(math.exp(-0.5 * logsnr_min)) - b
    t = TIME_GRID.astype(np.float64)
    alpha, sigma = COSINE.alpha_sigma(TIME_GRID)
    np.testing.assert_allclose(alpha, np.cos(a * t + b), atol=1e-6)
    np.testing.assert_allclose(sigma, np.sin(a * t + b), atol=1e-6)
    assert np.all(np.diff(np.asarray(alpha)) < 0) and np.all(np.diff(np.asarray(sigma)) > 0)
    # The log-SNR spans exactly [logsnr_min, logsnr_max].
    ends = np.asarray(COSINE.logsnr(jnp.asarray([0.0, 1.0])))
    np.testing.assert_allclose(ends, [logsnr_max, logsnr_min], rtol=1e-3)


def test_scaled_linear_matches_cumprod_of_betas() -> None:
    reference = _reference_alphas_cumprod()
    np.testing.assert_allclose(SCALED_LINEAR.alphas_cumprod(), reference, rtol=1e-12)
    k = np.arange(0, T + 1)
    alpha, sigma = SCALED_LINEAR.alpha_sigma(jnp.asarray(k / T, jnp.float32))
    alpha_bar = np.concatenate([[1.0], reference])
    np.testing.assert_allclose(np.asarray(alpha) ** 2, alpha_bar, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(sigma) ** 2, 1.0 - alpha_bar, rtol=2e-5, atol=1e-7)
    assert float(alpha[0]) == 1.0 and float(sigma[0]) == 0.0
    assert np.all(np.diff(np.asarray(alpha)) < 0)


def test_model_time() -> None:
    k = np.array([1, 11, 24, 500, 1000])
    np.testing.assert_allclose(SCALED_LINEAR.model_time(jnp.asarray(k / T, jnp.float32)), k - 1, atol=1e-3)
    np.testing.assert_allclose(COSINE.model_time(jnp.asarray([0.0, 0.25, 1.0])), [0.0, 250.0, 1000.0])


def test_unknown_schedule_and_fields_are_errors() -> None:
    with pytest.raises(ValueError, match="bogus"):
        diffusion.Schedule("bogus")
    with pytest.raises(ValueError, match="beta_mid"):
        diffusion.schedule_from_config({"kind": "cosine", "beta_mid": 0.1})
    assert diffusion.schedule_from_config({"kind": "scaled_linear"}) == SCALED_LINEAR


# ---------------------------------------------------------------- parametrizations


@pytest.mark.parametrize("parametrization", diffusion.PARAMETRIZATIONS)
@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_prediction_round_trip(kind: str, parametrization: str) -> None:
    """x, eps -> q_sample + true target -> x_eps_from_prediction recovers x and eps (per-example t)."""
    x, eps = _random((4, 4, 4, 3), 0), _random((4, 4, 4, 3), 1)
    t = jnp.asarray([0.02, 0.3, 0.7, 1.0])
    alpha, sigma = SCHEDULES[kind].alpha_sigma(t)
    z = diffusion.q_sample(x, eps, alpha, sigma)
    np.testing.assert_allclose(z, alpha[:, None, None, None] * x + sigma[:, None, None, None] * eps, atol=1e-6)
    target = diffusion.prediction_from_x_eps(x, eps, alpha, sigma, parametrization)
    x_hat, eps_hat = diffusion.x_eps_from_prediction(z, target, alpha, sigma, parametrization)
    # Float32 rounding of z (~1e-7 |z|) is amplified by 1/alpha when eps-prediction divides by alpha
    # (5.5e-4 at t = 1 on the clipped cosine) and by 1/sigma when x-prediction divides by sigma.
    a, s = np.asarray(alpha)[:, None, None, None], np.asarray(sigma)[:, None, None, None]
    assert np.all(np.abs(np.asarray(x_hat) - np.asarray(x)) <= 2e-5 + 1e-6 / a)
    assert np.all(np.abs(np.asarray(eps_hat) - np.asarray(eps)) <= 2e-5 + 1e-6 / s)
    # and back: the prediction implied by (x_hat, eps_hat) is the prediction we started from.
    again = diffusion.prediction_from_x_eps(x_hat, eps_hat, alpha, sigma, parametrization)
    np.testing.assert_allclose(again, target, atol=1e-4)


def test_v_formulas() -> None:
    x, eps = _random((2, 3, 3, 1), 2), _random((2, 3, 3, 1), 3)
    alpha, sigma = COSINE.alpha_sigma(jnp.asarray([0.4, 0.9]))
    a, s = np.asarray(alpha)[:, None, None, None], np.asarray(sigma)[:, None, None, None]
    v = diffusion.v_from_x_eps(x, eps, alpha, sigma)
    np.testing.assert_allclose(v, a * eps - s * x, atol=1e-6)
    z = diffusion.q_sample(x, eps, alpha, sigma)
    x_hat, eps_hat = diffusion.x_eps_from_prediction(z, v, alpha, sigma, "v")
    np.testing.assert_allclose(x_hat, a * np.asarray(z) - s * np.asarray(v), atol=1e-6)
    np.testing.assert_allclose(eps_hat, s * np.asarray(z) + a * np.asarray(v), atol=1e-6)


def test_unknown_parametrization() -> None:
    z = jnp.zeros((1, 2, 2, 1))
    with pytest.raises(ValueError, match="'score'"):
        diffusion.x_eps_from_prediction(z, z, 1.0, 0.0, "score")
    with pytest.raises(ValueError, match="'score'"):
        diffusion.prediction_from_x_eps(z, z, 1.0, 0.0, "score")


def test_ddim_with_true_eps() -> None:
    """DDIM with the true eps recovers x exactly and moves z_t onto alpha_s x + sigma_s eps."""
    x, eps = _random((2, 4, 4, 3), 4), _random((2, 4, 4, 3), 5)
    for schedule in SCHEDULES.values():
        alpha_t, sigma_t = schedule.alpha_sigma(jnp.asarray(0.74))
        alpha_s, sigma_s = schedule.alpha_sigma(jnp.asarray(0.48))
        z_t = diffusion.q_sample(x, eps, alpha_t, sigma_t)
        x_hat, eps_hat = diffusion.x_eps_from_prediction(z_t, eps, alpha_t, sigma_t, "eps")
        np.testing.assert_allclose(x_hat, x, atol=2e-5)
        z_s = diffusion.ddim_step(x_hat, eps_hat, alpha_s, sigma_s)
        np.testing.assert_allclose(z_s, alpha_s * x + sigma_s * eps, atol=2e-5)
        if schedule.is_discrete:
            alpha_0, sigma_0 = schedule.alpha_sigma(jnp.asarray(0.0))
            np.testing.assert_array_equal(diffusion.ddim_step(x_hat, eps_hat, alpha_0, sigma_0), x_hat)
    # Moving to t = 0 returns x_hat itself on the discrete schedule (alpha_bar(0) = 1). The cosine
    # schedule's log-SNR is clipped at logsnr_max = 15, so sigma(0) = 1 / sqrt(1 + e^15) = 5.5e-4,
    # not 0: a sampler's last step must return x_hat rather than a DDIM move to t = 0.
    _, sigma_0 = COSINE.alpha_sigma(jnp.asarray(0.0))
    np.testing.assert_allclose(sigma_0, 1 / math.sqrt(1 + math.exp(15)), rtol=1e-4)


# ---------------------------------------------------------------- sampling grid


def test_sampling_grid() -> None:
    np.testing.assert_allclose(diffusion.sampling_grid(4, 50), np.array([50, 37, 24, 11, 0]) / 50)
    np.testing.assert_allclose(diffusion.sampling_grid(1, 50), [1.0, 0.0])
    np.testing.assert_allclose(diffusion.sampling_grid(2, 50), np.array([50, 25, 0]) / 50)
    grid8 = diffusion.sampling_grid(8, 50)
    np.testing.assert_allclose(grid8, np.array([50, 43, 36, 29, 22, 15, 8, 1, 0]) / 50)
    for steps in (1, 2, 4, 8, 50):
        grid = diffusion.sampling_grid(steps, 50)
        assert grid.dtype == np.float32 and len(grid) == steps + 1 and grid[0] == 1.0 and grid[-1] == 0.0
        assert np.all(np.diff(grid) < 0)
        ks = grid[:-1] * 50
        np.testing.assert_allclose(ks, np.round(ks), atol=1e-4)  # on the training grid
    # 4 steps on N = 50 in SD's integer time (t * T - 1): the start times 999, 739, 479, 219.
    np.testing.assert_allclose(
        SCALED_LINEAR.model_time(diffusion.sampling_grid(4, 50)[:-1]), [999, 739, 479, 219], atol=1e-3
    )
    with pytest.raises(ValueError, match="at most 50"):
        diffusion.sampling_grid(51, 50)
    with pytest.raises(ValueError, match="num_steps"):
        diffusion.sampling_grid(0, 50)


# ---------------------------------------------------------------- against diffusers


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_matches_diffusers(prediction_type: str) -> None:
    pytest.importorskip("torch")
    schedulers = pytest.importorskip("diffusers.schedulers")
    scheduler = schedulers.DDIMScheduler(
        num_train_timesteps=T,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=True,
        prediction_type=prediction_type,
    )
    np.testing.assert_allclose(SCALED_LINEAR.alphas_cumprod(), scheduler.alphas_cumprod.numpy(), rtol=1e-5)
    tau = np.arange(T)
    alpha, _ = SCALED_LINEAR.alpha_sigma(jnp.asarray((tau + 1) / T, jnp.float32))
    np.testing.assert_allclose(np.asarray(alpha) ** 2, scheduler.alphas_cumprod.numpy(), rtol=2e-5)

    parametrization = {"epsilon": "eps", "v_prediction": "v"}[prediction_type]
    sample = np.random.RandomState(6).randn(2, 3, 4, 4).astype(np.float32)
    output = np.random.RandomState(7).randn(2, 3, 4, 4).astype(np.float32)
    scheduler.set_timesteps(4)
    assert [int(tau) for tau in scheduler.timesteps] == [750, 500, 250, 0]
    _compare_ddim_steps(scheduler, [750, 500, 250, 0], T // 4, sample, output, parametrization)
    scheduler.set_timesteps(50)
    assert int(scheduler.timesteps[0]) == 980 and int(scheduler.timesteps[-1]) == 0
    _compare_ddim_steps(scheduler, [980, 620, 20, 0], T // 50, sample, output, parametrization)


def _compare_ddim_steps(
    scheduler, timesteps: list[int], stride: int, sample: np.ndarray, output: np.ndarray, parametrization: str
) -> None:
    import torch

    for tau in timesteps:
        expected = scheduler.step(torch.from_numpy(output), tau, torch.from_numpy(sample), eta=0.0)
        prev_tau = tau - stride
        t, s = (tau + 1) / T, (prev_tau + 1) / T if prev_tau >= 0 else 0.0  # final step: alpha = 1, t = 0
        alpha_t, sigma_t = SCALED_LINEAR.alpha_sigma(jnp.asarray(t))
        alpha_s, sigma_s = SCALED_LINEAR.alpha_sigma(jnp.asarray(s))
        to_nhwc = (0, 2, 3, 1)
        x_hat, eps_hat = diffusion.x_eps_from_prediction(
            jnp.asarray(sample.transpose(to_nhwc)),
            jnp.asarray(output.transpose(to_nhwc)),
            alpha_t,
            sigma_t,
            parametrization,
        )
        z_s = diffusion.ddim_step(x_hat, eps_hat, alpha_s, sigma_s)
        # eps-prediction at tau = 0 divides by alpha ~ 1 and at tau = 750 by alpha ~ 0.16.
        np.testing.assert_allclose(
            x_hat, expected.pred_original_sample.numpy().transpose(to_nhwc), rtol=1e-4, atol=1e-4
        )
        np.testing.assert_allclose(z_s, expected.prev_sample.numpy().transpose(to_nhwc), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("flip_sin_to_cos", [True, False])
@pytest.mark.parametrize("freq_shift", [0, 1])
def test_timestep_embedding_matches_diffusers(flip_sin_to_cos: bool, freq_shift: int) -> None:
    torch = pytest.importorskip("torch")
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    timesteps = np.array([0.0, 1.0, 17.0, 250.5, 999.0], np.float32)
    for dim in (32, 33):
        expected = embeddings.get_timestep_embedding(
            torch.from_numpy(timesteps), dim, flip_sin_to_cos=flip_sin_to_cos, downscale_freq_shift=freq_shift
        )
        ours = timestep_embedding(jnp.asarray(timesteps), dim, flip_sin_to_cos=flip_sin_to_cos, freq_shift=freq_shift)
        assert ours.shape == tuple(expected.shape)
        # float32 sin/cos of arguments up to ~1000 rad: ulp of the argument is ~6e-5.
        np.testing.assert_allclose(ours, expected.numpy(), atol=2e-4)


def test_dpm_solver_pp_solves_the_gaussian_probability_flow_ode() -> None:
    """For data x ~ N(0, s^2) the exact denoiser is known, and the probability-flow ODE maps z_1 to
    x_0 = z_1 * s / sqrt(alpha_1^2 s^2 + sigma_1^2) (it preserves quantiles). DPM-Solver++(2M)
    must converge to that, at second order: far closer than DDIM at the same step count."""
    from codi_jax.sampling import samplers

    schedule = diffusion.Schedule("cosine")
    data_std = 0.3  # samples stay inside [-1, 1]: DDIM clips its x_hat

    def exact_x_prediction(params, z_t, model_t):
        alpha, sigma = schedule.alpha_sigma(model_t[0] / 1000.0)
        return alpha * data_std**2 * z_t / (alpha**2 * data_std**2 + sigma**2)

    z_init = jax.random.normal(jax.random.PRNGKey(0), (4, 2, 2, 3))
    assert float(jnp.max(jnp.abs(z_init))) * data_std < 0.95
    alpha_1, sigma_1 = schedule.alpha_sigma(jnp.float32(1.0))
    expected = z_init * data_std / jnp.sqrt(alpha_1**2 * data_std**2 + sigma_1**2)
    times = jnp.linspace(1.0, 1e-3, 21)
    dpm = samplers.dpm_solver_pp_sample(exact_x_prediction, None, z_init, times, schedule, "x", clip_denoised=False)
    fine = samplers.dpm_solver_pp_sample(
        exact_x_prediction, None, z_init, jnp.linspace(1.0, 1e-3, 201), schedule, "x", clip_denoised=False
    )
    ddim = samplers.ddim_sample(exact_x_prediction, None, z_init, times, schedule, "x")
    err_dpm = float(jnp.max(jnp.abs(dpm - expected)))
    err_fine = float(jnp.max(jnp.abs(fine - expected)))
    err_ddim = float(jnp.max(jnp.abs(ddim - expected)))
    assert err_fine < 2e-3, err_fine
    assert err_dpm < 0.25 * err_ddim, (err_dpm, err_ddim)  # measured 0.010 vs 0.070 at 20 steps


def test_example_noise_depends_only_on_seed_and_index() -> None:
    """Row b of ``example_noise`` is ``normal(fold_in(PRNGKey(seed), i_b))``, drawn here one key at a
    time; the same index gets the same noise whatever else is in the batch."""
    from codi_jax.sampling import samplers

    shape = (3, 2, 4)
    rows = samplers.example_noise(7, [0, 5, 2], shape)
    for row, index in zip(rows, (0, 5, 2)):
        expected = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(7), index), shape)
        np.testing.assert_array_equal(np.asarray(row), np.asarray(expected))
    np.testing.assert_array_equal(np.asarray(samplers.example_noise(7, [5], shape))[0], np.asarray(rows[1]))
    assert not np.allclose(samplers.example_noise(8, [0], shape)[0], rows[0])
    keys = samplers.example_keys(7, [5])
    np.testing.assert_array_equal(np.asarray(keys[0]), np.asarray(jax.random.fold_in(jax.random.PRNGKey(7), 5)))


def test_sample_in_batches_gives_each_example_its_own_noise_at_any_batch_size() -> None:
    """The loop hands example i the noise ``example_noise(seed, [i])`` and re-noising keys
    ``example_keys(seed + 1, [i])`` (or None), so the samples do not depend on the batch size."""
    from codi_jax.sampling import samplers

    shape, seen = (2, 2, 3), []

    def sample_fn(batch, z_init, keys):
        seen.append((batch, keys is None))
        extra = 0.0 if keys is None else jax.vmap(lambda k: jax.random.uniform(k, shape))(keys)
        return z_init + extra

    outputs = {}
    for batch_size in (1, 3, 7):
        outputs[batch_size], ms = samplers.sample_in_batches(
            sample_fn, 7, shape, seed=4, renoise=True, batch_size=batch_size
        )
        assert ms >= 0.0
    np.testing.assert_array_equal(outputs[1], outputs[3])
    np.testing.assert_array_equal(outputs[1], outputs[7])
    key = samplers.example_keys(5, [6])[0]
    expected = samplers.example_noise(4, [6], shape)[0] + jax.random.uniform(key, shape)
    np.testing.assert_array_equal(outputs[3][6], np.asarray(expected))
    assert [b for b, _ in seen[1:4]] == [slice(1, 2), slice(2, 3), slice(3, 4)]
    seen.clear()
    plain, _ = samplers.sample_in_batches(sample_fn, 2, shape, seed=4, renoise=False, batch_size=2, warm_up=sample_fn)
    assert seen == [(slice(0, 2), True)] * 2  # warm-up: the first batch once more, untimed
    np.testing.assert_array_equal(plain, np.asarray(samplers.example_noise(4, [0, 1], shape)))


def test_process_shares_cover_every_example_once_in_order() -> None:
    """With P processes each samples a contiguous block of ceil(N / P), padded with example N - 1:
    the blocks, concatenated in process order and cut at N, are examples 0..N-1 (no gap, no
    repeat), and every process runs the same number of examples (so the same number of batches)."""
    from codi_jax.sampling import samplers

    for num, count in ((11, 2), (7, 3), (2, 4), (8, 8), (5, 1)):
        shares = [samplers.process_share(num, p, count) for p in range(count)]
        assert len({len(share) for share in shares}) == 1, (num, count)
        np.testing.assert_array_equal(np.concatenate(shares)[:num], np.arange(num))
        assert np.concatenate(shares).max() == num - 1


def test_ddim_renoising_draws_each_examples_noise_from_its_own_key() -> None:
    """A model that predicts x = 0 makes every re-noised DDIM move ``z_s = sigma_s eps``: the last
    move (``output="z"``) is ``sigma_end normal(fold_in(key_b, last step))``, per example."""
    from codi_jax.sampling import samplers

    schedule = diffusion.Schedule("cosine")
    times = jnp.asarray([1.0, 0.6, 0.3], jnp.float32)
    z_init = jnp.ones((3, 2, 2, 3))
    keys = samplers.example_keys(11, [0, 1, 2])

    def zero_x(params, z_t, model_t):
        return jnp.zeros_like(z_t)

    z = samplers.ddim_sample(zero_x, None, z_init, times, schedule, "x", keys, output="z")
    _, sigma_end = schedule.alpha_sigma(times[-1])
    for b in range(3):
        eps = jax.random.normal(jax.random.fold_in(keys[b], 1), (2, 2, 3))
        np.testing.assert_allclose(
            np.asarray(z[b]), np.asarray(sigma_end * eps), rtol=1e-6, atol=1e-6 * float(sigma_end)
        )
    alone = samplers.ddim_sample(zero_x, None, z_init[1:2], times, schedule, "x", keys[1:2], output="z")
    np.testing.assert_array_equal(np.asarray(alone[0]), np.asarray(z[1]))
    deterministic = samplers.ddim_sample(zero_x, None, z_init, times, schedule, "x", output="z")
    assert not np.allclose(deterministic, z)
