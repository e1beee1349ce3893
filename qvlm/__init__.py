"""Q-VLM Studio: post-training quantization of LLaVA-style vision-language models (arXiv 2410.08119)."""

__version__ = "0.1.0"
