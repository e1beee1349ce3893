"""Q-VLM Studio: post-training quantization of LLaVA-style vision-language models (arXiv 2410.08119)."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``qvlm.load_quantized`` / ``qvlm.load_model`` without importing torch at ``import qvlm``."""
    if name == "load_quantized":
        from qvlm.export import load_quantized

        return load_quantized
    if name == "load_model":  # a checkpoint or a packed export folder, as the app's picker takes them
        from qvlm.export import load_model

        return load_model
    raise AttributeError(f"module 'qvlm' has no attribute {name!r}")
