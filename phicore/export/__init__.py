"""Shipping a fine-tuned model: merged Hugging Face folders (merge.py), GGUF for llama.cpp
(gguf.py, kquants.py, quant_plan.py, gguf_lora.py), Ollama (ollama.py), mlx-lm adapters
(mlx_adapter.py), model cards (model_card.py); each checked once written (verify.py,
gguf_vocabulary.py, llama_check.py); infer.py's flags for them in targets.py."""


class ExportError(ValueError):
    """An export that cannot be done as asked (target exists, unsupported weight, missing
    optional package): one line for the user."""


class VerifyError(Exception):
    """An export that does not read back as the model in memory: one line naming the file and tensor."""


__all__ = ["ExportError", "VerifyError"]
