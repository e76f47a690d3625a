"""Shipping a fine-tuned model: the adapter merged into its base and written as a standalone
Hugging Face folder (merge.py), or as a GGUF file for llama.cpp (gguf.py)."""


class ExportError(ValueError):
    """An export that cannot be done as asked (target exists, unsupported weight, missing
    optional package): one line for the user."""


__all__ = ["ExportError"]
