"""The shipped ml-collections configs, one file per task and scale: ``cpu/``, ``paper/``, ``sd/``.

Load one by path (``--config=codi_jax/configs/cpu/codi_sr4.py``, from any folder after
``pip install -e .``) or import it in a config of your own::

    from codi_jax.configs.sd import sd15_sr4

    def get_config():
        config = sd15_sr4.get_config()
        config.teacher_workdir = "/models/sd15_teacher"
        return config
"""

import pathlib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def committed_checkpoint(name: str) -> str:
    """The absolute path of a workdir committed under the repository's ``checkpoints/``."""
    return str(REPO_ROOT / "checkpoints" / name)
