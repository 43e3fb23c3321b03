"""CoDi's loss terms on a flow-matching teacher, against NumPy written in the flow's own terms.

The reference below never goes through ``alpha_sigma``: it writes the path ``(1 - t) x + t eps``,
the velocity's ``x_hat = z_t - t v`` and ``eps_hat = z_t + (1 - t) v``, the PREv move
``(1 - s) sg(x_hat) + s eps``, and the DDIM / teacher moves as Euler steps ``z_t + (s - t) v``, on
the shifted grid ``t = shift u / (1 + (shift - 1) u)``, ``u = k / N``. The network is the linear
stand-in of ``tests/test_codi.py`` (``pred = a z + b cond + c t``).
"""

from __future__ import annotations

import functools

import jax
import ml_collections
import numpy as np
import pytest

from codi_jax import diffusion, flow_matching
from codi_jax.objectives import codi
from codi_jax.sampling import conditional, samplers
from tests.test_codi import B, LinearStub, S, _draws, _stub_params


def _shifted(u: np.ndarray, shift: float) -> np.ndarray:
    return shift * u / (1.0 + (shift - 1.0) * u)


def _bc(values: np.ndarray) -> np.ndarray:
    return values[:, None, None, None]


def _np_flow_codi_loss(params, target_params, x, cond, k, eps, config, shift):
    n = config.grid_size
    t, s = _shifted(k / n, shift), _shifted((k - 1) / n, shift)
    tb, sb = _bc(t), _bc(s)

    def net(p, a, b, z, time):
        return p[a] * z + p[b] * cond + p["c"] * _bc(time)

    z_t = (1 - tb) * x + tb * eps
    v_hat = net(params, "a", "b", z_t, t)
    x_hat, eps_hat = z_t - tb * v_hat, z_t + (1 - tb) * v_hat
    if config.predictor == "prev":
        z_s = (1 - sb) * x_hat + sb * eps
    elif config.predictor == "ddim":
        z_s = z_t + (sb - tb) * v_hat  # the online model's Euler step
    else:
        z_s = z_t + (sb - tb) * net(params, "a0", "b0", z_t, t)  # one teacher Euler step
    v_tgt = net(target_params, "a", "b", z_s, s)
    x_tgt, eps_tgt = z_s - sb * v_tgt, z_s + (1 - sb) * v_tgt
    at_data = _bc(k == 1)
    x_tgt, eps_tgt = np.where(at_data, x, x_tgt), np.where(at_data, eps, eps_tgt)
    if config.consistency_space == "eps":
        consistency = np.mean((eps_hat - eps_tgt) ** 2)
    else:
        consistency = np.mean((x_hat - x_tgt) ** 2)
    if config.guidance_schedule == "velocity":  # r times the flow-matching loss: v = eps - x
        guidance = np.mean((v_hat - (eps - x)) ** 2)
    else:
        weight = tb**2 if config.guidance_schedule == "noise" else 1.0
        guidance = np.mean(weight * (x_hat - x) ** 2)
    return consistency + config.guidance_weight * guidance


@pytest.mark.parametrize(
    "predictor,space,shared_t,r,guidance,shift",
    [
        ("prev", "eps", False, 1.0, "constant", 1.0),
        ("prev", "eps", True, 4.0, "constant", 3.0),
        ("prev", "x", False, 0.5, "noise", 1.0),
        ("prev", "eps", False, 2.0, "velocity", 3.0),
        ("ddim", "eps", False, 1.0, "constant", 3.0),
        ("teacher", "eps", False, 0.0, "constant", 3.0),
    ],
)
def test_flow_codi_loss_matches_numpy(predictor, space, shared_t, r, guidance, shift) -> None:
    config = codi.default_codi_config()
    config.update(predictor=predictor, consistency_space=space, shared_t=shared_t, guidance_weight=r, grid_size=3)
    config.guidance_schedule = guidance
    schedule = flow_matching.FlowSchedule(shift=shift)
    rng = np.random.default_rng(0)
    x, cond = (rng.uniform(-1, 1, (B, S, S, 3)).astype(np.float32) for _ in range(2))
    params, target_params = _stub_params(1), _stub_params(2)
    loss_fn = jax.jit(functools.partial(codi.codi_loss, setup=codi.LossSetup(LinearStub(), schedule, "v", config)))
    seen = set()
    for seed in range(12):
        key = jax.random.PRNGKey(seed)
        loss, aux = loss_fn(params, target_params, {"image": x, "cond": cond}, key)
        k, eps = _draws(key, config)
        seen |= set(k.tolist())
        expected = _np_flow_codi_loss(params, target_params, x.astype(np.float64), cond, k, eps, config, shift)
        np.testing.assert_allclose(float(loss), expected, rtol=2e-5)
        np.testing.assert_allclose(float(aux["t"]), np.mean(_shifted(k / 3, shift)), rtol=1e-6)
    assert {1, 2, 3} <= seen  # the data boundary, an interior point and t = 1 (z_t = eps) all checked


def test_eps_consistency_does_not_constrain_the_top_of_the_flow_grid() -> None:
    """At t = 1, ``eps_hat = z_t + 0 v = eps`` whatever the network says: the eps-space consistency
    has no gradient there and the x_0 guidance term alone trains the top step (docs/flow_matching.md)."""
    config = codi.default_codi_config()
    config.update(grid_size=1, guidance_weight=0.0)  # k = 1 only: t = 1, s = 0
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-1, 1, (B, S, S, 3)).astype(np.float32)}
    batch["cond"] = rng.uniform(-1, 1, (B, S, S, 3)).astype(np.float32)
    loss = functools.partial(
        codi.codi_loss, setup=codi.LossSetup(LinearStub(), flow_matching.FlowSchedule(), "v", config)
    )
    params = _stub_params(1)
    grads = jax.grad(lambda p: loss(p, params, batch, jax.random.PRNGKey(0))[0])(params)
    assert all(abs(float(g)) < 1e-6 for g in jax.tree.leaves(grads))
    config.guidance_weight = 1.0
    grads = jax.grad(lambda p: loss(p, params, batch, jax.random.PRNGKey(0))[0])(params)
    assert abs(float(grads["a"])) > 1e-2


@pytest.mark.parametrize("renoise", [False, True])
def test_few_step_flow_sampling_matches_numpy(renoise) -> None:
    """Few-step sampling on a flow schedule: ``x_hat = z - t v`` at each grid time, then the Euler
    step (deterministic) or ``(1 - s) x_hat + s eps_k`` with fresh noise (re-noising)."""
    schedule = flow_matching.FlowSchedule(shift=3.0)
    times = np.asarray(schedule.grid_time(diffusion.sampling_grid(3, 6)), np.float32)
    params = {"a": np.float32(0.4), "b": np.float32(0.3), "c": np.float32(0.5)}
    rng = np.random.default_rng(1)
    cond = rng.uniform(-1, 1, (B, S, S, 3)).astype(np.float32)
    z0 = rng.normal(size=(B, S, S, 3)).astype(np.float32)
    apply_fn = lambda p, z, model_t: LinearStub.apply(p, z, model_t, cond)  # noqa: E731
    keys = samplers.example_keys(0, np.arange(B)) if renoise else None
    out = samplers.ddim_sample(apply_fn, params, z0, times, schedule, "v", keys, clip_denoised=True)

    z = z0.astype(np.float64)
    for i, (t, s) in enumerate(zip(times[:-1].astype(np.float64), times[1:].astype(np.float64))):
        v = params["a"] * z + params["b"] * cond + params["c"] * t
        x_hat = np.clip(z - t * v, -1, 1)
        if renoise:
            step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, i)
            fresh = np.asarray(jax.vmap(lambda key: jax.random.normal(key, (S, S, 3)))(step_keys), np.float64)
        else:
            fresh = z + (1 - t) * v  # eps_hat: with x_hat unclipped, (1 - s) x_hat + s eps_hat = z + (s - t) v
        z = (1 - s) * x_hat + s * fresh
    np.testing.assert_allclose(np.asarray(out), x_hat, atol=1e-5)
    assert times[0] == 1.0 and times[-1] == 0.0
    np.testing.assert_allclose(times[1:-1], _shifted(np.array([4 / 6, 2 / 6]), 3.0), rtol=1e-6)


def test_codi_samples_on_its_shifted_grid_and_the_baseline_on_the_euler_grid() -> None:
    config = ml_collections.ConfigDict({"method": "codi", "codi": {"grid_size": 50}})
    config.schedule = {"kind": "flow", "shift": 3.0}
    np.testing.assert_allclose(
        conditional.sample_times(config, 4), _shifted(diffusion.sampling_grid(4, 50).astype(np.float64), 3.0), 1e-6
    )
    config.method = "finetune"
    np.testing.assert_array_equal(conditional.sample_times(config, 4), flow_matching.euler_times(4, 3.0))


def test_flow_parametrization_is_resolved_and_checked() -> None:
    assert diffusion.resolve_parametrization(flow_matching.FlowSchedule(), "v") == "flow"
    assert diffusion.resolve_parametrization(diffusion.Schedule(), "v") == "v"
    with pytest.raises(ValueError, match=r"^model.parametrization='eps': a flow-matching schedule predicts"):
        diffusion.resolve_parametrization(flow_matching.FlowSchedule(), "eps")
    with pytest.raises(ValueError, match=r"^parametrization 'flow' needs a flow-matching schedule"):
        diffusion.resolve_parametrization(diffusion.Schedule(), "flow")
    with pytest.raises(ValueError, match=r"^--solver=dpm\+\+ is for VP schedules"):
        samplers.dpm_solver_pp_sample(None, None, np.zeros((1, 2, 2, 3)), np.ones(2), flow_matching.FlowSchedule(), "v")
