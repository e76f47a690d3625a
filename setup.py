"""phicore: LoRA and QLoRA fine-tuning of Microsoft's Phi-2 and Phi-3 family models."""

from setuptools import find_packages, setup

setup(
    name="phicore",
    version="0.1.0",
    description="A small, readable LoRA/QLoRA fine-tuning engine for Phi-2 and Phi-3 family models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["phicore", "phicore.*", "kernels", "kernels.*"]),
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
        "test": ["pytest", "transformers", "peft", "bitsandbytes", "triton", "gguf"],
        "plot": ["matplotlib"],
    },
    license="MIT",
)
