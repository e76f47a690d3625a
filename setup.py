"""phicore: LoRA and QLoRA fine-tuning of Microsoft's Phi-2 and Phi-3 family models."""

import os
import sys

from setuptools import find_packages, setup

# This folder's kernels/ must not stand in for Hugging Face's `kernels` while building: that
# package hooks into setuptools (an egg_info writer in kernels.locking), which would import
# ours from here. Nothing below imports from this folder.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]

setup(
    name="phicore",
    version="0.1.0",
    description="A small, readable LoRA/QLoRA fine-tuning engine for Phi-2 and Phi-3 family models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # kernels/ sits at the repository's top level (one folder per concern) but installs as
    # phicore.kernels: the global import name `kernels` belongs to Hugging Face's package.
    packages=find_packages(include=["phicore", "phicore.*"]) + ["phicore.kernels"],
    package_dir={"phicore.kernels": "kernels"},
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.4",
        "safetensors",
        "tokenizers",
        "huggingface-hub",
        "numpy",
        "tqdm",
        "jinja2",  # chat templates; torch already depends on it
    ],
    extras_require={
        # the oracles; Hugging Face's kernels for tests/test_packaging.py; mlx-lm for the MLX adapter export
        # (llama-cpp-python builds llama.cpp from source, 15+ minutes: install it yourself; its tests skip)
        "test": ["pytest", "pytest-timeout", "transformers", "peft", "bitsandbytes", "triton", "gguf", "kernels", "pyarrow",
                 "mlx[cpu]; sys_platform == 'linux'", "mlx-lm; sys_platform == 'linux' or sys_platform == 'darwin'"],
        "plot": ["matplotlib"],
        "hub": ["pyarrow"],  # Parquet files of hub datasets (--data ORG/NAME)
    },
    license="MIT",
)
