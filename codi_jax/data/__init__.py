"""Data: the offline `skimage_patches` tfds builder and tf.data input pipelines."""

from codi_jax.data.pipeline import (
    SOURCES,
    build_dataset,
    default_data_config,
    list_image_files,
    load_image_rgb,
    numpy_iterator,
    to_global_batch,
)
from codi_jax.data.skimage_patches import PATCH_SIZES, SkimagePatches

__all__ = [
    "PATCH_SIZES",
    "SOURCES",
    "SkimagePatches",
    "build_dataset",
    "default_data_config",
    "list_image_files",
    "load_image_rgb",
    "numpy_iterator",
    "to_global_batch",
]
