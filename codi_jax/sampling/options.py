"""How a trained run is sampled, as one record: every sampling command and evaluation takes it.

The flags of ``sample`` / ``evaluate`` / ``demo`` (``--seed``, ``--batch_size``, ``--solver``,
``--renoise``, ``--lowpass_consistency``, ``--ema``, ``--guidance_scale``, ``--prompt``) become one
``SamplingOptions`` that travels unchanged from the command line to the sampler; the step counts
travel beside it (a command samples several).
"""

from __future__ import annotations

import dataclasses

SOLVERS = ("ddim", "dpm++")
DTYPES = ("float32", "bfloat16", "run")


def parse_step_counts(text: str, where: str | None = None) -> tuple[int, ...]:
    """``"1,2,4"`` -> ``(1, 2, 4)``, every count a positive integer; errors start with ``where``
    (default ``--steps=TEXT``)."""
    where = f"--steps={text}" if where is None else where
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"{where}: step counts are comma-separated integers, e.g. 1,2,4.") from None
    if not counts:
        raise ValueError(f"{where}: give at least one step count.")
    if min(counts) < 1:
        raise ValueError(f"{where}: every step count must be at least 1.")
    return counts


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """``seed``: example i's noise is drawn from (seed, i) and its re-noising from (seed + 1, i).
    ``renoise``: re-noise between steps (None: the run's default, CoDi's ``codi.renoise``; DDIM only).
    ``lowpass_consistency``: replace each step's low frequencies by the condition's (pixel-space SR).
    ``ema``: the EMA weights (False: the raw trained ones). ``guidance_scale`` / ``prompt``: text runs
    (None: the run's own ``sample_guidance_scale`` / ``text.prompt``). ``dtype``: the network's compute
    dtype: ``float32`` (the saved float32 weights computed as they are, as the exported diffusers
    pipeline does: its images equal these), ``bfloat16``, or ``run`` (the run's ``model.dtype``, as it
    trained and sampled during training)."""

    seed: int = 0
    batch_size: int = 64
    solver: str = "ddim"
    renoise: bool | None = None
    lowpass_consistency: bool = False
    ema: bool = True
    guidance_scale: float | None = None
    prompt: str | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"--batch_size={self.batch_size}: must be at least 1.")
        if self.solver not in SOLVERS:
            raise ValueError(f"--solver={self.solver!r}; valid: {', '.join(SOLVERS)}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype={self.dtype!r}; valid: {', '.join(DTYPES)}.")
        if self.renoise and self.solver != "ddim":
            raise ValueError(f"Re-noising between steps needs solver='ddim', not {self.solver!r}.")
        if self.guidance_scale is not None and self.guidance_scale < 0:
            raise ValueError(f"--guidance_scale={self.guidance_scale}: must be >= 0.")

    @property
    def model_dtype(self) -> str | None:
        """The ``dtype`` for ``pretrained.load`` (None: the run's own)."""
        return None if self.dtype == "run" else self.dtype

    def with_seed(self, seed: int) -> SamplingOptions:
        """The same options with another seed (one row per sampling seed)."""
        return dataclasses.replace(self, seed=seed)
