"""dsa_jax: autoregressive video diffusion with Dynamic Step Allocation, in JAX/Flax."""

from setuptools import find_namespace_packages, find_packages, setup

# Ranges admit jax 0.10.2 (Python 3.11, CPU) and jax 0.11.2 (Python 3.12, CUDA).
INSTALL_REQUIRES = [
    "jax>=0.10.0,<0.13",
    "flax>=0.12.0,<0.14",
    "optax>=0.2.5,<0.3",
    "orbax-checkpoint>=0.12.0,<0.14",
    "grain>=0.2.12,<0.3",
    "ml-collections>=1.0,<2",
    "tensorflow-datasets>=4.9.8,<5",
    "array-record>=0.8; platform_system == 'Linux'",
    "numpy>=1.26",
    "imageio>=2.34",
    "imageio-ffmpeg>=0.5",
    "matplotlib>=3.8",
    "scikit-learn>=1.4",
    "tensorboardX>=2.6",
    "sentencepiece>=0.2",
]

EXTRAS = {
    "gpu": ["jax[cuda12]>=0.10.0,<0.13"],
    "tpu": ["jax[tpu]>=0.10.0,<0.13"],
    # torch==2.13.0 resolves to the CPU build shipped on our CI machines; any torch>=2.4 works for conversion.
    "convert": ["torch>=2.4", "diffusers>=0.35", "transformers>=4.50", "safetensors>=0.4", "sentencepiece>=0.2"],
    "test": ["pytest>=8", "pytest-xdist>=3.5", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29"],
}

setup(
    name="dsa_jax",
    version="0.1.0",
    description="Fast autoregressive video generation with Dynamic Step Allocation (JAX/Flax)",
    # The asset folders (model checkpoints) are listed as namespace packages: setuptools otherwise warns about
    # every folder of data files that looks importable.
    packages=find_packages(include=["dsa_jax", "dsa_jax.*"]) + find_namespace_packages(include=["dsa_jax.assets.*"]),
    package_data={"dsa_jax": ["assets/**/*"]},
    include_package_data=True,
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["dsa-jax=dsa_jax.cli:console_main"]},
)
