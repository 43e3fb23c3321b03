"""Data: the ``task`` section of a config (``task_spec``, no TensorFlow) and the tf.data input
pipelines (``pipeline``, ``tasks``, ``degradations``, ``procedural``, the offline
``skimage_patches`` tfds builder; TensorFlow).

Nothing is imported here, so ``from codi_jax.data import task_spec`` does not load TensorFlow:
the models, losses, samplers and checkpoints only ever need ``task_spec``. The pipeline modules
import TensorFlow when they are imported, where data is read.
"""
