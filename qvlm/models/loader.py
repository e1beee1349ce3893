"""Load a LLaVA-family model and its processor: the bundled model, a local folder or a hub id.

One function, :func:`load_vlm`, for every source, so the app, the CLI and the benchmarks
share validation: the model type must be LLaVA-family, remote code is never trusted, and the
memory a model needs is estimated from its config (on the meta device) before any weight
is read.
"""

from __future__ import annotations

import os
import re
import socket
from functools import lru_cache
from urllib.parse import urlparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoConfig, AutoProcessor, PretrainedConfig

from qvlm.data.tasks import DEFAULT_TASK, recorded_task
from qvlm.models.device import default_dtype, resolve_device
from qvlm.models.layer_map import LayerMap, build_layer_map

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLED_MODEL_DIR = REPO_ROOT / "assets" / "tiny-llava-easyvqa"
BUNDLED_MODEL_NAME = "bundled: tiny-llava-easyvqa"
MOSAIC_MODEL_DIR = REPO_ROOT / "assets" / "tiny-llava-mosaic"
MOSAIC_MODEL_NAME = "bundled: tiny-llava-mosaic"
BUNDLED_MODELS: dict[str, Path] = {BUNDLED_MODEL_NAME: BUNDLED_MODEL_DIR, MOSAIC_MODEL_NAME: MOSAIC_MODEL_DIR}
"""The models the project trains and ships, by display name (the first is the app's default)."""
SHORT_NAMES: dict[str, str] = {"bundled": BUNDLED_MODEL_NAME, "easyvqa": BUNDLED_MODEL_NAME,
                               "mosaic": MOSAIC_MODEL_NAME}
"""What ``--model`` accepts besides folders and hub ids."""


def bundled_name(folder: str | os.PathLike) -> str | None:
    """The display name of a bundled model's folder, or None for any other folder."""
    resolved = Path(folder).resolve()
    return next((name for name, d in BUNDLED_MODELS.items() if d.resolve() == resolved), None)

Source = Literal["bundled", "local", "hub"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def model_classes() -> dict[str, type]:
    """model_type -> the transformers class; families are added here and in the layer map only."""
    from transformers import (
        LlavaForConditionalGeneration,
        LlavaNextForConditionalGeneration,
        LlavaOnevisionForConditionalGeneration,
    )

    return {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration,
            "llava_onevision": LlavaOnevisionForConditionalGeneration}


SUPPORTED_MODEL_TYPES = ("llava", "llava_next", "llava_onevision")

PACKED_EXPORT_MANIFEST = "qvlm_quant.json"
"""The file that marks a folder as a Q-VLM packed export (written by :mod:`qvlm.export`)."""


def is_packed_export(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a Q-VLM packed export rather than a transformers checkpoint.

    Its ``model.safetensors`` holds packed codes, not the model's weights: loading it as a checkpoint
    would leave every quantized Linear randomly initialised, so the loaders ask this first.
    """
    return (Path(folder) / PACKED_EXPORT_MANIFEST).is_file()


@dataclass
class VLMHandle:
    """A loaded model with what every later stage needs to find its way around it."""

    model: torch.nn.Module
    processor: Any
    layer_map: LayerMap
    name: str
    source: Source
    task: str = DEFAULT_TASK  # what it was trained on: its calibration pairs and its test split
    task_recorded: bool = True
    """Whether the model's folder (training report, export manifest) says ``task``; False: assumed
    (:data:`DEFAULT_TASK`, e.g. a hub checkpoint), and evaluation says so (:func:`task_note`)."""
    checkpoint_dtype: torch.dtype | None = None
    """The dtype its checkpoint stores floats in (float16 for the bundled models), which may differ from
    the dtype it computes in (:attr:`dtype`, float32 on a CPU): what an export writes its floats in."""
    execution_path: str | None = None
    """How its quantized Linears run ("integer kernels", "simulated", "mixed: ..."), set by
    :func:`qvlm.quant.integer.use_integer_kernels`; None: not asked."""
    simulated_layers: dict[str, str] = field(default_factory=dict)
    """Quantized Linears left on the simulated path -> why (:func:`qvlm.quant.integer.refusal`)."""

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def save_dtype(self) -> torch.dtype:
        """The dtype an export writes the model's floating-point tensors in: its checkpoint's own."""
        return self.checkpoint_dtype or self.dtype


def checkpoint_dtype_of(config: PretrainedConfig) -> torch.dtype | None:
    """The dtype a (not yet loaded) config says its weights are stored in; None when it does not say."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def task_note(handle: VLMHandle, task: str | None = None) -> str | None:
    """One line when ``handle`` is scored on a task that is not known to be its own, else None.

    ``task`` None: the task evaluation picks (``handle.task``), which is only worth a word when the
    folder did not record it.
    """
    task = task or handle.task
    if task != handle.task:
        return f"note: {handle.name} was trained for {handle.task}, and is scored here on {task}."
    if not handle.task_recorded:
        return (f"note: {handle.name} does not record the task it was trained for; it is scored on "
                f"{task}, the default.")
    return None


class ModelLoadError(ValueError):
    """A model that cannot be used, with a message meant for the person who asked for it."""


def resolve_source(name_or_path: str | os.PathLike, allowed_roots: list[Path] | None = None) -> tuple[str, Source]:
    """Decide whether ``name_or_path`` is the bundled model, a local folder or a hub id.

    ``allowed_roots`` limits local folders (the app passes its allow-list; the CLI passes None).
    """
    text = str(name_or_path).strip()
    if not text:
        raise ModelLoadError("No model given.")
    text = SHORT_NAMES.get(text, text)
    if text in BUNDLED_MODELS:
        folder = BUNDLED_MODELS[text]
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"{text} is not in this checkout ({folder} holds no model); "
                                 "train it with `python -m training mosaic --out assets/tiny-llava-mosaic`.")
        return str(folder), "bundled"
    path = Path(text).expanduser()
    looks_local = path.is_absolute() or text.startswith((".", "~")) or path.exists() or not _HUB_ID.match(text)
    if not looks_local:
        return text, "hub"
    resolved = path.resolve()
    if allowed_roots is not None and not any(resolved.is_relative_to(r.resolve()) for r in allowed_roots):
        roots = ", ".join(str(r) for r in allowed_roots)
        raise ModelLoadError(f"{text} is outside the folders this app may read ({roots}).")
    if not resolved.is_dir():
        raise ModelLoadError(f"No model folder at {text} (and it is not a hub id of the form owner/name).")
    if not (resolved / "config.json").is_file():
        raise ModelLoadError(f"{text} has no config.json: not a transformers model folder.")
    source: Source = "bundled" if bundled_name(resolved) else "local"
    return str(resolved), source


@lru_cache(maxsize=1)
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (asked once per process).

    Why: offline, transformers retries a hub request for about 40 s before it fails; one short connection
    attempt tells the user at once, and a model already in the local cache still loads from there.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def local_files_only(source: Source) -> bool:
    """Read only local files: always for folders, and for a hub id when the hub does not answer (its cache)."""
    return source != "hub" or not hub_reachable()


def load_config(location: str, source: Source) -> PretrainedConfig:
    """The model config, checked to be a supported LLaVA family that needs no remote code."""
    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=False, local_files_only=local_files_only(source))
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ModelLoadError(
                f"{location} needs trust_remote_code=True (custom code from the model repository), "
                "which Q-VLM Studio never enables: only stock transformers LLaVA models are supported."
            ) from err
        raise ModelLoadError(f"{location}: unreadable model config ({err}).") from err
    except OSError as err:
        if source == "hub":
            raise ModelLoadError(
                f"Could not fetch {location} from the Hugging Face hub: the id is unknown or private."
                if hub_reachable() else
                f"{location} is not in this machine's model cache and the Hugging Face hub is unreachable "
                "from here, so it cannot be downloaded."
            ) from err
        raise ModelLoadError(f"{location}: unreadable model folder ({err}).") from err
    if getattr(config, "auto_map", None):
        raise ModelLoadError(
            f"{location} declares custom code (auto_map) that needs trust_remote_code, which stays off."
        )
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"{location} is a '{config.model_type}' model, not a LLaVA-family vision-language model "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})."
        )
    return config


def estimate_weight_bytes(config: PretrainedConfig, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the weights in ``dtype``, counted on the meta device (no memory, no download of weights)."""
    cls = model_classes()[config.model_type]
    with torch.device("meta"):
        model = cls(config)
    n = sum(p.numel() for p in model.parameters())
    return n * torch.tensor([], dtype=dtype).element_size()


def available_memory_bytes(device: str | torch.device = "cpu") -> int:
    """Free memory where the model will live: the GPU's free bytes for a CUDA device, otherwise
    MemAvailable from /proc/meminfo (Linux), or a large number where neither can be read."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


QUANTIZE_MEMORY_FACTOR = 1.6
"""Peak memory of a quantize run as a multiple of the FP weights: the FP model (1.0), the packed
quantized Linears of the working copy (at most 0.5 at W8 from FP16; the rest of the copy shares the
FP tensors, :mod:`qvlm.quant.working_copy`), and cached calibration activations plus one layer being
searched or one VEO micro-batch (~0.1 for LLaVA-1.5-7B with 64 pairs). See benchmarks/README.md."""


def check_fits(config: PretrainedConfig, dtype: torch.dtype, budget_bytes: int | None = None,
               factor: float = QUANTIZE_MEMORY_FACTOR, device: str | torch.device = "cpu") -> int:
    """Refuse a model whose weights times ``factor`` (FP model + packed copy + activations) exceed
    the free memory of ``device`` (or ``budget_bytes``), before any weight is loaded."""
    need = estimate_weight_bytes(config, dtype)
    budget = available_memory_bytes(device) if budget_bytes is None else budget_bytes
    if need * factor > budget:
        where = "on this GPU" if torch.device(device).type == "cuda" else "here"
        raise ModelLoadError(
            f"This model needs about {need / 2**30:.1f} GiB for its weights in {str(dtype).removeprefix('torch.')} "
            f"(about {need * factor / 2**30:.1f} GiB to quantize it), but only {budget / 2**30:.1f} GiB "
            f"is free {where}. Try a smaller model, dtype float16, or device_map='auto' across devices."
        )
    return need


def copies_fit(config: PretrainedConfig, copies: int = 2, dtype: torch.dtype | None = None,
               device: str | torch.device | None = None, budget_bytes: int | None = None) -> bool:
    """Whether ``copies`` full-precision copies of this model's weights fit in the free memory of
    ``device`` (default: :func:`resolve_device`), e.g. the FP model and a second one side by side.

    A packed quantized variant is smaller than an FP copy, so two FP copies is the safe bound for an
    FP + quantized pair; this counts weights only (activations of one generate call come on top).
    """
    device = resolve_device(device)
    need = estimate_weight_bytes(config, dtype or default_dtype(device)) * copies
    return need <= (available_memory_bytes(device) if budget_bytes is None else budget_bytes)


def _quantized_checkpoint_kwargs(config: PretrainedConfig) -> dict[str, Any]:
    """``from_pretrained`` arguments for a checkpoint that is already quantized.

    A compressed-tensors checkpoint (this project's ``--format compressed-tensors``, or llm-compressor's)
    is decompressed while loading (``dequantize=True``): left compressed, compressed-tensors 0.20
    decompresses on the first forward call, which fails under ``torch.inference_mode`` (the mode every
    evaluation here runs in). The weights are the same dequantized values either way.
    """
    quant = getattr(config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    if method == "compressed-tensors":
        from transformers import CompressedTensorsConfig

        return {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    return {}


def load_vlm(
    name_or_path: str | os.PathLike = BUNDLED_MODEL_NAME,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    allowed_roots: list[Path] | None = None,
    memory_budget_bytes: int | None = None,
    device_map: str | dict | None = None,
) -> VLMHandle:
    """Load model + processor + layer map of a checkpoint. Raises :class:`ModelLoadError` with a readable message.

    ``device`` None: :func:`~qvlm.models.device.resolve_device` (``$QVLM_DEVICE``, else CUDA when
    available, else CPU); ``dtype`` None: :func:`~qvlm.models.device.default_dtype` of that device.
    ``device_map="auto"`` (needs ``accelerate``) spreads a model larger than one device over
    several; the memory check is then left to accelerate.

    A Q-VLM packed export folder is refused with a message naming ``qvlm.load_vlm``: the packed
    format is read by :mod:`qvlm.export`, which sits above this module (``qvlm.load_vlm`` and
    ``qvlm.export.load_model`` take both kinds of folder).
    """
    location, source = resolve_source(name_or_path, allowed_roots)
    if source != "hub" and is_packed_export(location):
        raise ModelLoadError(
            f"{name_or_path} is a Q-VLM packed export, not a checkpoint: open it with qvlm.load_vlm "
            "or qvlm.export.load_model (or qvlm.load_quantized)."
        )
    device = resolve_device(device)
    dtype = dtype or default_dtype(device)
    config = load_config(location, source)
    stored_dtype = checkpoint_dtype_of(config)  # read before loading: from_pretrained rewrites config.dtype
    if device_map is None:
        check_fits(config, dtype, memory_budget_bytes, device=device)
    cls = model_classes()[config.model_type]
    local_only = local_files_only(source)
    extra = {"device_map": device_map} if device_map is not None else {}
    extra |= _quantized_checkpoint_kwargs(config)
    try:
        processor = AutoProcessor.from_pretrained(location, trust_remote_code=False, local_files_only=local_only)
        model = cls.from_pretrained(
            location, dtype=dtype, trust_remote_code=False, local_files_only=local_only, **extra
        )
    except (OSError, ImportError) as err:
        raise ModelLoadError(f"Could not load the weights or processor of {location}: {err}") from err
    if device_map is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    name = bundled_name(location) if source == "bundled" else str(name_or_path)
    recorded = None if source == "hub" else recorded_task(location)
    return VLMHandle(model=model, processor=processor, layer_map=build_layer_map(model), name=name, source=source,
                     task=recorded or DEFAULT_TASK, task_recorded=recorded is not None, checkpoint_dtype=stored_dtype)
