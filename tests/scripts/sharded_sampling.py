"""Run in a subprocess with 8 simulated CPU devices: evaluation's sampling (``evaluate.sample_all``,
the batch split over every device, padded where it does not divide) against the same loop on one
device, for a random tiny CoDi student; prints one JSON line.

Usage: python tests/scripts/sharded_sampling.py
"""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from codi_jax.configs.cpu import tiny_codi, tiny_teacher
from codi_jax.data import task_spec
from codi_jax.evaluation import evaluate
from codi_jax.models import networks
from codi_jax.runs.pretrained import Pretrained
from codi_jax.sampling import conditional, samplers
from codi_jax.sampling.options import SamplingOptions

NUM, BATCH = 11, 6  # two batches: 6 (padded to 8 on 8 devices) and 5 (padded to 8)


def tiny_student() -> Pretrained:
    config, teacher = tiny_codi.get_config(), tiny_teacher.get_config()
    with config.unlocked():
        config.model = ml_collections.ConfigDict(teacher.model.to_dict())
        config.schedule = ml_collections.ConfigDict(teacher.schedule.to_dict())
    model, schedule = networks.build_conditional(config)
    size, channels = int(config.data.image_size), int(config.model.in_channels)
    sample = jnp.zeros((1, size, size, channels))
    backbone = model.backbone.init(jax.random.PRNGKey(0), sample, jnp.zeros((1,)), None)["params"]
    cond = jnp.zeros((1, size, size, task_spec.cond_channels(config.task)))
    params = model.init(jax.random.PRNGKey(1), backbone, cond, None, sample_shape=sample.shape)
    # A random adapter (its zero convs made non-zero), so the condition changes the samples.
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
    return Pretrained(model, schedule, config.model.parametrization, params, config, 0, "")


def one_device(pre: Pretrained, examples: dict, num_steps: int, options: SamplingOptions) -> np.ndarray:
    """The same sampling loop with no mesh: every batch on the default device."""
    sampler = evaluate.make_sampler(pre, options)
    times = jnp.asarray(conditional.sample_times(pre.config, num_steps))
    params = jax.device_put(pre.params, jax.devices()[0])

    def sample_fn(batch, z_init, keys):
        return sampler(params, examples["cond"][batch], None, z_init, times, keys)

    samples, _ = samplers.sample_in_batches(
        sample_fn, NUM, examples["image"].shape[1:], seed=options.seed, renoise=True, batch_size=BATCH
    )
    return samples


def main() -> None:
    assert len(jax.devices()) == 8, jax.devices()
    pre = tiny_student()
    size, rng = int(pre.config.data.image_size), np.random.RandomState(0)
    examples = {
        "image": rng.uniform(-1, 1, (NUM, size, size, 3)).astype(np.float32),
        "cond": rng.uniform(-1, 1, (NUM, size, size, 3)).astype(np.float32),
    }
    options = SamplingOptions(seed=3, batch_size=BATCH, renoise=True)
    result = {}
    for num_steps in (2,):  # two steps: the initial noise and the re-noising keys are both split
        sharded, _ = evaluate.sample_all(pre, examples, num_steps, options)
        single = one_device(pre, examples, num_steps, options)
        result[str(num_steps)] = dict(
            shape=list(sharded.shape),
            max_diff=float(np.max(np.abs(sharded - single))),
            spread=float(np.std(single)),
            cond_effect=float(np.max(np.abs(single[0] - single[1]))),
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
