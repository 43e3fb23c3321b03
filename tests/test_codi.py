"""The CoDi objective against a hand-written NumPy computation, and its train step.

The loss is checked with a linear stand-in network (``pred = a z + b cond + c t``), for which
every quantity can be written out in NumPy with the cosine schedule's closed form
``alpha_t^2 = sigmoid(logsnr(t))``; only the random draws (k, eps) are taken from JAX's RNG.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from codi_jax import diffusion
from codi_jax.metrics import lpips
from codi_jax.models import adapters, student
from codi_jax.models.unet import UNet
from codi_jax.objectives import codi
from codi_jax.training.train_state import create_train_state, make_optimizer, model_params

SCHEDULE = diffusion.Schedule("cosine")
B, S = 8, 4


def _text_and_w(params, context, guidance_scale):
    """The stub's context term ``d mean(context)`` and guidance term ``e (w - 1)`` (0 when absent)."""
    out = 0.0
    if context is not None:
        out = out + params.get("d", 0.0) * jnp.mean(context, axis=(1, 2))[:, None, None, None]
    if guidance_scale is not None:
        out = out + params.get("e", 0.0) * (guidance_scale - 1.0)[:, None, None, None]
    return out


class LinearStub:
    """Duck-typed ``AdaptedModel``: ``pred = a z + b cond + c (model_t / 1000)`` [+ text / w terms]."""

    @staticmethod
    def apply(params, z, model_t, cond, instruction=None, context=None, *, guidance_scale=None, train=False, rngs=None):
        linear = params["a"] * z + params["b"] * cond + params["c"] * (model_t / 1000.0)[:, None, None, None]
        return linear + _text_and_w(params, context, guidance_scale)

    @staticmethod
    def apply_initial(params, z, model_t, cond, instruction=None, context=None, *, guidance_scale=None):
        linear = params["a0"] * z + params["b0"] * cond + params["c"] * (model_t / 1000.0)[:, None, None, None]
        return linear + _text_and_w(params, context, guidance_scale)


def _np_alpha_sigma(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Independent of Schedule.alpha_sigma's cos(a t + b) form: log-SNR then sigmoid.
    b = math.atan(math.exp(-7.5))
    a = math.atan(math.exp(7.5)) - b
    logsnr = -2.0 * np.log(np.tan(a * t + b))
    alpha_sq = 1.0 / (1.0 + np.exp(-logsnr))
    return np.sqrt(alpha_sq), np.sqrt(1.0 - alpha_sq)


def _np_linear(params, z, t, cond):
    return params["a"] * z + params["b"] * cond + params["c"] * t[:, None, None, None]


def _np_codi_loss(params, target_params, x, cond, k, eps, config):
    n = config.grid_size
    t, s = k / n, (k - 1) / n
    a_t, s_t = (v[:, None, None, None] for v in _np_alpha_sigma(t))
    a_s, s_s = (v[:, None, None, None] for v in _np_alpha_sigma(s))
    z_t = a_t * x + s_t * eps
    v_hat = _np_linear(params, z_t, t, cond)
    x_hat, eps_hat = a_t * z_t - s_t * v_hat, s_t * z_t + a_t * v_hat
    if config.predictor == "prev":
        z_s = a_s * x_hat + s_s * eps
    elif config.predictor == "ddim":
        z_s = a_s * x_hat + s_s * eps_hat
    else:
        v0 = params["a0"] * z_t + params["b0"] * cond + params["c"] * t[:, None, None, None]
        z_s = a_s * (a_t * z_t - s_t * v0) + s_s * (s_t * z_t + a_t * v0)
    v_tgt = _np_linear(target_params, z_s, s, cond)
    x_tgt, eps_tgt = a_s * z_s - s_s * v_tgt, s_s * z_s + a_s * v_tgt
    boundary = (k == 1)[:, None, None, None]
    x_tgt, eps_tgt = np.where(boundary, x, x_tgt), np.where(boundary, eps, eps_tgt)
    if config.consistency_space == "eps":
        consistency = np.mean((eps_hat - eps_tgt) ** 2)
    elif config.consistency_space == "lpips":  # the metric itself is checked against PyTorch's lpips
        lpips_variables = lpips.load_packaged_lpips()
        distances = lpips.lpips_distance(lpips_variables, x_hat.astype(np.float32), x_tgt.astype(np.float32))
        consistency = np.mean(np.asarray(distances, np.float64))
    else:
        consistency = np.mean((x_hat - x_tgt) ** 2)
    if config.guidance_schedule == "velocity":  # r times the v-prediction loss: v = alpha eps - sigma x
        guidance = np.mean((v_hat - (a_t * eps - s_t * x)) ** 2)
    else:
        r_of_t = s_t**2 if config.guidance_schedule == "noise" else 1.0
        guidance = np.mean(r_of_t * (x_hat - x) ** 2)
    return consistency + config.guidance_weight * guidance


def _draws(rng, config):
    """The (k, eps) that codi_loss draws from ``rng`` (same splits)."""
    rng_k, rng_eps, _ = jax.random.split(rng, 3)
    k = jax.random.randint(rng_k, () if config.shared_t else (B,), 1, config.grid_size + 1)
    k = np.broadcast_to(np.asarray(k), (B,)).astype(np.float64)
    return k, np.asarray(jax.random.normal(rng_eps, (B, S, S, 3)), np.float64)


def _stub_params(seed):
    rng = np.random.default_rng(seed)
    return {name: np.float32(rng.uniform(0.2, 0.8)) for name in ("a", "b", "c", "a0", "b0")}


@pytest.mark.parametrize(
    "predictor,space,shared_t,r,schedule",
    [
        ("prev", "eps", True, 1.0, "constant"),
        ("prev", "eps", False, 1.0, "constant"),
        ("prev", "x", False, 0.5, "constant"),
        ("prev", "lpips", False, 0.5, "constant"),
        ("prev", "eps", False, 2.0, "noise"),
        ("prev", "eps", False, 2.0, "velocity"),
        ("ddim", "eps", False, 1.0, "constant"),
        ("teacher", "eps", False, 0.0, "constant"),
    ],
)
def test_codi_loss_matches_numpy(predictor, space, shared_t, r, schedule) -> None:
    config = codi.default_codi_config()
    config.update(predictor=predictor, consistency_space=space, shared_t=shared_t, guidance_weight=r, grid_size=3)
    config.guidance_schedule = schedule
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (B, S, S, 3)).astype(np.float32)
    cond = rng.uniform(-1, 1, (B, S, S, 3)).astype(np.float32)
    params, target_params = _stub_params(1), _stub_params(2)
    loss_fn = jax.jit(functools.partial(codi.codi_loss, setup=codi.LossSetup(LinearStub(), SCHEDULE, "v", config)))
    seen_boundary = seen_interior = False
    for seed in range(6):
        key = jax.random.PRNGKey(seed)
        loss, _ = loss_fn(params, target_params, {"image": x, "cond": cond}, key)
        k, eps = _draws(key, config)
        seen_boundary |= bool(np.any(k == 1))
        seen_interior |= bool(np.any(k > 1))
        expected = _np_codi_loss(params, target_params, x.astype(np.float64), cond, k, eps, config)
        np.testing.assert_allclose(float(loss), expected, rtol=2e-4 if space == "lpips" else 2e-5)
    assert seen_boundary and seen_interior


def _jitted_train_step(model, optimizer, config):
    """``codi.train_step`` bound as the tests run it: v-prediction, EMA decay 0.9, no warm-up."""
    step = functools.partial(
        codi.train_step,
        model=model,
        schedule=SCHEDULE,
        optimizer=optimizer,
        ema_decay=0.9,
        ema_warmup=False,
        parametrization="v",
        config=config,
    )
    return jax.jit(step)


@pytest.mark.parametrize("target", ["ema", "online"])
def test_train_step_target_network_is_the_ema_or_the_online_params(target) -> None:
    """The loss a train step reports is the NumPy loss with the EMA params (``codi.target='ema'``)
    or the online params (``'online'``) as the target network."""
    config = codi.default_codi_config()
    config.update(shared_t=False, grid_size=3, target=target)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (B, S, S, 3)).astype(np.float32)
    cond = rng.uniform(-1, 1, (B, S, S, 3)).astype(np.float32)
    params, ema = _stub_params(1), _stub_params(2)
    optimizer = make_optimizer(
        ml_collections.ConfigDict(
            dict(learning_rate=1e-3, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0)
        )
    )
    state = create_train_state(params, optimizer, jax.random.PRNGKey(0)).replace(ema_params=ema)
    key = jax.random.PRNGKey(5)
    _, metrics = _jitted_train_step(LinearStub(), optimizer, config)(state, {"image": x, "cond": cond}, key)
    k, eps = _draws(key, config)
    assert np.any(k > 1)  # an interior t, where the target network matters
    expected = {
        name: _np_codi_loss(params, target_params, x.astype(np.float64), cond, k, eps, config)
        for name, target_params in (("ema", ema), ("online", params))
    }
    assert abs(expected["ema"] - expected["online"]) > 1e-3 * expected["ema"]
    np.testing.assert_allclose(float(metrics["loss"]), expected[target], rtol=2e-5)


def _np_cfg_loss(params, target_params, x, cond, k, eps, m_text, m_null, w, config):
    """NumPy CoDi loss with CFG-aware distillation (stub: text term d m, w term e (w - 1))."""
    n, w4 = config.grid_size, w[:, None, None, None]
    text, null = m_text[:, None, None, None], m_null[:, None, None, None]
    t, s = k / n, (k - 1) / n
    a_t, s_t = (v[:, None, None, None] for v in _np_alpha_sigma(t))
    a_s, s_s = (v[:, None, None, None] for v in _np_alpha_sigma(s))
    z_t = a_t * x + s_t * eps
    v_hat = _np_linear(params, z_t, t, cond) + params["d"] * text + params["e"] * (w4 - 1.0)
    x_hat = a_t * z_t - s_t * v_hat
    if config.predictor == "prev":
        z_s = a_s * x_hat + s_s * eps
    else:  # teacher: the initial model, guided (uncond + w (cond - uncond)) at the neutral w = 1
        base = params["a0"] * z_t + params["b0"] * cond + params["c"] * t[:, None, None, None]
        v0 = base + params["d"] * null + w4 * params["d"] * (text - null)
        z_s = a_s * (a_t * z_t - s_t * v0) + s_s * (s_t * z_t + a_t * v0)
    base = _np_linear(target_params, z_s, s, cond)
    v_tgt = base + target_params["d"] * null + w4 * target_params["d"] * (text - null)
    eps_tgt = np.where((k == 1)[:, None, None, None], eps, s_s * z_s + a_s * v_tgt)
    eps_hat = s_t * z_t + a_t * v_hat
    return np.mean((eps_hat - eps_tgt) ** 2) + config.guidance_weight * np.mean((x_hat - x) ** 2)


@pytest.mark.parametrize("predictor", ["prev", "teacher"])
def test_cfg_aware_loss_matches_numpy_and_w1_is_no_guidance(predictor) -> None:
    config = codi.default_codi_config()
    config.update(predictor=predictor, shared_t=False, grid_size=3, cfg_range=(1.5, 7.0))
    rng = np.random.default_rng(0)
    x, cond = (rng.uniform(-1, 1, (B, S, S, 3)).astype(np.float32) for _ in range(2))
    context, uncond = (rng.normal(size=(B, 5, 6)).astype(np.float32) for _ in range(2))
    batch = {"image": x, "cond": cond, "context": context, "uncond_context": uncond}
    params, target_params = _stub_params(1), _stub_params(2)
    for p, seed in ((params, 3), (target_params, 4)):
        p.update(d=np.float32(np.random.default_rng(seed).uniform(0.2, 0.8)), e=np.float32(0.3))
    loss_of = lambda cfg: jax.jit(
        functools.partial(codi.codi_loss, setup=codi.LossSetup(LinearStub(), SCHEDULE, "v", cfg))
    )
    key = jax.random.PRNGKey(5)
    loss, _ = loss_of(config)(params, target_params, batch, key)
    k, eps = _draws(key, config)
    w = np.asarray(jax.random.uniform(jax.random.fold_in(key, 3), (B,), minval=1.5, maxval=7.0), np.float64)
    assert np.ptp(w) > 1.0  # per-example scales
    m_text, m_null = context.mean(axis=(1, 2)), uncond.mean(axis=(1, 2))
    expected = _np_cfg_loss(params, target_params, x.astype(np.float64), cond, k, eps, m_text, m_null, w, config)
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5)

    # w = 1: exactly the loss without guidance (the student's w term and the guidance vanish).
    unguided = config.copy_and_resolve_references()
    unguided.cfg_range = ()
    config.cfg_range = (1.0, 1.0)
    plain, _ = loss_of(unguided)(params, target_params, {**batch, "uncond_context": None}, key)
    at_one, _ = loss_of(config)(params, target_params, batch, key)
    assert float(at_one) == float(plain)


def test_cfg_range_is_checked() -> None:
    config = codi.default_codi_config()
    for bad in ((3.0, 2.0), (1.0,), (-1.0, 2.0)):
        config.cfg_range = bad
        with pytest.raises(ValueError, match="cfg_range"):
            codi.check_codi_config(config)


def test_gradient_flows_only_through_the_online_prediction() -> None:
    config = codi.default_codi_config()
    config.grid_size = 3
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-1, 1, (B, S, S, 3)).astype(np.float32)}
    batch["cond"] = rng.uniform(-1, 1, (B, S, S, 3)).astype(np.float32)
    params, target_params = _stub_params(1), _stub_params(2)
    loss_fn = functools.partial(codi.codi_loss, setup=codi.LossSetup(LinearStub(), SCHEDULE, "v", config))
    key = jax.random.PRNGKey(4)
    target_grads = jax.grad(lambda tp: loss_fn(params, tp, batch, key)[0])(target_params)
    assert all(float(g) == 0.0 for g in jax.tree.leaves(target_grads))
    # d loss / d a equals the derivative with z_s_hat and the targets held fixed (stop-gradients):
    # a central difference of the NumPy loss where the target side uses the unperturbed params.
    k, eps = _draws(key, config)
    x64 = batch["image"].astype(np.float64)

    def frozen_target_loss(a):
        n = config.grid_size
        t, s = k / n, (k - 1) / n
        a_t, s_t = (v[:, None, None, None] for v in _np_alpha_sigma(t))
        a_s, s_s = (v[:, None, None, None] for v in _np_alpha_sigma(s))
        z_t = a_t * x64 + s_t * eps
        v_ref = _np_linear(params, z_t, t, batch["cond"])
        z_s = a_s * (a_t * z_t - s_t * v_ref) + s_s * eps
        v_tgt = _np_linear(target_params, z_s, s, batch["cond"])
        eps_tgt = np.where((k == 1)[:, None, None, None], eps, s_s * z_s + a_s * v_tgt)
        v_hat = _np_linear({**params, "a": a}, z_t, t, batch["cond"])
        x_hat, eps_hat = a_t * z_t - s_t * v_hat, s_t * z_t + a_t * v_hat
        return np.mean((eps_hat - eps_tgt) ** 2) + np.mean((x_hat - x64) ** 2)

    h = 1e-5
    numeric = (frozen_target_loss(float(params["a"]) + h) - frozen_target_loss(float(params["a"]) - h)) / (2 * h)
    grads = jax.grad(lambda p: loss_fn(p, target_params, batch, key)[0])(params)
    np.testing.assert_allclose(float(grads["a"]), numeric, rtol=1e-3)


def test_finetune_loss_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (B, S, S, 3)).astype(np.float32)
    cond = rng.uniform(-1, 1, (B, S, S, 3)).astype(np.float32)
    params = _stub_params(1)
    key = jax.random.PRNGKey(3)
    loss, _ = codi.finetune_loss(
        params,
        None,
        {"image": x, "cond": cond},
        key,
        setup=codi.LossSetup(LinearStub(), SCHEDULE, "v", codi.default_codi_config()),
    )
    rng_t, rng_eps, _ = jax.random.split(key, 3)
    t = 1.0 - np.asarray(jax.random.uniform(rng_t, (B,)), np.float64)
    eps = np.asarray(jax.random.normal(rng_eps, x.shape), np.float64)
    a_t, s_t = (v[:, None, None, None] for v in _np_alpha_sigma(t))
    z_t = a_t * x + s_t * eps
    v_target = a_t * eps - s_t * x
    expected = np.mean((_np_linear(params, z_t, t, cond) - v_target) ** 2)
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5)


def test_bad_codi_config_is_named() -> None:
    config = codi.default_codi_config()
    config.predictor = "euler"
    with pytest.raises(ValueError, match="codi.predictor='euler'"):
        codi.check_codi_config(config)
    config = codi.default_codi_config()
    config.target = "teacher"
    with pytest.raises(ValueError, match="codi.target='teacher'"):
        codi.check_codi_config(config)


@functools.cache
def _tiny_adapted(kind: str = "controlnet"):
    backbone = UNet(
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        attention_levels=(False, True),
        attention_head_dim=16,
    )
    backbone_params = jax.jit(backbone.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,)))[
        "params"
    ]
    adapter_config = adapters.default_adapter_config()
    adapter_config.update(kind=kind, hint_channels=(8, 16), train_backbone=kind == "fusion")
    model = student.build_adapted_model(backbone, adapter_config, cond_channels=3)
    return model, backbone_params


def test_pe_codi_train_step_lowers_loss_and_keeps_backbone() -> None:
    model, backbone_params = _tiny_adapted()
    optimizer_config = ml_collections.ConfigDict(
        dict(learning_rate=2e-3, warmup_steps=0, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0)
    )
    optimizer = make_optimizer(optimizer_config)
    config = codi.default_codi_config()
    rng = np.random.default_rng(0)
    hr = np.repeat(np.repeat(rng.uniform(-1, 1, (8, 4, 4, 3)), 4, 1), 4, 2).astype(np.float32)
    batch = {"image": hr, "cond": hr + 0.1 * rng.standard_normal(hr.shape).astype(np.float32)}

    @jax.jit
    def init(backbone_params):
        params = model.init(jax.random.PRNGKey(1), backbone_params, jnp.zeros((1, 16, 16, 3)), None)
        trained, frozen = model.split(params)
        return create_train_state(trained, optimizer, jax.random.PRNGKey(2), frozen)

    state = init(backbone_params)
    step = _jitted_train_step(model, optimizer, config)
    eval_loss = jax.jit(
        lambda p: codi.codi_loss(
            p, p, batch, jax.random.PRNGKey(99), setup=codi.LossSetup(model, SCHEDULE, "v", config)
        )[1]["guidance"]
    )
    assert sorted(state.params) == ["adapter"] and sorted(state.frozen) == ["backbone"]
    before = float(eval_loss(model_params(state, ema=False)))
    start = state
    for i in range(12):
        state, metrics = step(state, batch, jax.random.PRNGKey(i))
    assert float(metrics["skipped_nonfinite"]) == 0.0
    after = float(eval_loss(model_params(state, ema=False)))
    assert after < 0.9 * before, (before, after)
    for a, b in zip(jax.tree.leaves(start.frozen["backbone"]), jax.tree.leaves(state.frozen["backbone"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    changed = [
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(start.params["adapter"]), jax.tree.leaves(state.params["adapter"]))
    ]
    assert all(changed)
    # The EMA target moved towards the online params but not onto them.
    zero_conv = lambda p: np.asarray(p["adapter"]["controlnet_mid_block"]["kernel"])  # noqa: E731
    assert 0 < np.abs(zero_conv(state.ema_params)).max() < np.abs(zero_conv(state.params)).max()


def test_lpips_consistency_traces_twice_and_refuses_latents() -> None:
    """The LPIPS weights enter each trace as constants: a second trace (another shape) must not meet a
    tracer left in the loader's cache by the first; latents (4 channels) get a readable error."""
    lpips._load_packaged_cached.cache_clear()  # the first load happens inside the trace below
    rng = np.random.default_rng(0)
    distance = jax.jit(codi.consistency_distance, static_argnums=0)
    for size in (8, 16):
        a, b = (rng.uniform(-1, 1, (2, size, size, 3)).astype(np.float32) for _ in range(2))
        got = float(distance("lpips", a, b, a, b))
        expected = float(np.mean(lpips.lpips_distance(lpips.load_packaged_lpips(), a, b)))
        assert got == pytest.approx(expected, rel=1e-5) and got > 0
    latents = np.zeros((2, 8, 8, 4), np.float32)
    with pytest.raises(ValueError, match="needs RGB pixel-space samples"):
        codi.consistency_distance("lpips", latents, latents, latents, latents)
