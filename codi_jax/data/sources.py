"""The ``data`` config section: where images come from (``SOURCES``) and every field's default.

TensorFlow-free, so configs import it without loading the input pipeline (``codi_jax.data.pipeline``
reads these fields; its docstring describes each source).
"""

from __future__ import annotations

import ml_collections

SOURCES = ("skimage_patches", "tfds", "folder", "edit_triples")


def default_data_config() -> ml_collections.ConfigDict:
    """The ``data`` section's fields and their defaults."""
    config = ml_collections.ConfigDict()
    config.source = "skimage_patches"  # one of SOURCES
    config.tfds_name = ""  # for source='tfds', e.g. 'div2k/bicubic_x4', 'nyu_depth_v2'
    config.image_key = "image"  # feature holding the image for source='tfds'
    # Text-conditioned runs: the caption's column of a folder's metadata.jsonl (.txt sidecars need
    # none) or a tfds source's string feature; '' = no captions (the fixed text.prompt).
    config.caption_key = "text"
    config.folder = ""  # for source='folder': directory of images, searched recursively
    config.data_dir = ""  # tfds data_dir ('' = tfds default)
    config.image_size = 32  # output size; skimage_patches uses config patches{image_size}
    config.train_split = "train"
    config.eval_split = "test"
    config.random_flip = True  # horizontal flip, training only
    config.random_crop = False  # random crop at native resolution (tfds/folder), else resize
    # Training only: the share of examples whose colours are changed (pipeline._recolor): a teacher
    # whose prior is not the training photographs' palettes. 0 = off (streams as before).
    config.color_augment = 0.0
    config.shuffle_buffer = 10_000
    return config
