"""Installs the `cogvideox_jax` model library.

Training programs (`train/`), data pipelines (`data/`), configs and tools run from the repository
root and are not installed. The base install is all that training, sampling, conversion and data
preparation need (the demo's README command installs only it). The `test` extra pulls the
PyTorch numerical reference (install torch==2.13.0 first so pip takes the CPU build). The `aot`
extra is libtpu, which `tools.aot` needs to compile for a TPU slice on any machine; tests run
tools.aot, so `test` includes it.
"""

from setuptools import find_packages, setup

setup(
    name="cogvideox_jax",
    version="0.1.0",
    description="CogVideoX training and inference in JAX/Flax NNX",
    python_requires=">=3.11",
    packages=find_packages(include=["cogvideox_jax", "cogvideox_jax.*"]),
    install_requires=[
        # Pinned: flax renamed its sharding metadata twice; orbax's API moves between minors.
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "grain==0.2.18",
        "numpy>=2",
        "ml_dtypes",
        "safetensors>=0.4",
        "einops",
        "ml-collections",
        "absl-py",
        "tqdm",
        # The T5 tokenizer (transformers' T5Tokenizer; sentencepiece reads `spiece.model`).
        "transformers==5.23.0",
        "sentencepiece",
        # Video files (PyAV bundles FFmpeg with libx264) and image inputs.
        "av",
        "Pillow",
        # Training logs (TensorBoard event files without TensorFlow).
        "tensorboardX",
        # Prepared datasets: ArrayRecord files written and read through TFDS (no TensorFlow).
        "tensorflow-datasets==4.9.10",
        "array_record",
    ],
    extras_require={
        # The libtpu that jax 0.10.2's own `jax[tpu]` extra pins (its METADATA: libtpu==0.0.42.*).
        "aot": ["libtpu==0.0.42.*"],
        "test": [
            "torch==2.13.0",
            "diffusers==0.42.1",
            "peft==0.21.2",  # diffusers' LoRA loading (load_lora_weights), in the LoRA tests
            "pytest",
            "pytest-xdist",  # the README's test command runs the files on 2 worker processes
            "libtpu==0.0.42.*",
        ],
    },
)
