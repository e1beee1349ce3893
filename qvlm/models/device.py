"""Where models run: the one device choice (CPU, a CUDA GPU, or a Hugging Face ZeroGPU slice).

Everything that puts a model somewhere (``load_vlm``, ``load_quantized``, the app, the GPU benchmark)
asks :func:`resolve_device` and :func:`default_dtype`, so one environment variable moves all of
them: ``QVLM_DEVICE`` = ``cpu``, ``cuda``, ``cuda:1``, or ``auto`` (the default: the first CUDA GPU
when there is one, else the CPU).

On a ZeroGPU Space the GPU exists only inside functions decorated with ``spaces.GPU``; the app
wraps its GPU work in :func:`gpu_task`, which is that decorator there and does nothing anywhere else.
"""

from __future__ import annotations

import os
from typing import Callable, TypeVar

import torch

DEVICE_ENV = "QVLM_DEVICE"

F = TypeVar("F", bound=Callable)


def resolve_device(requested: str | torch.device | None = None) -> torch.device:
    """The device to use: ``requested`` if given, else ``$QVLM_DEVICE``, else CUDA when available.

    Raises ValueError (one sentence for the user) for a name torch does not know or a GPU this
    machine does not have, instead of failing later inside ``model.to``.
    """
    text = str(requested if requested is not None else os.environ.get(DEVICE_ENV, "auto")).strip().lower()
    if on_zero_gpu():
        # ZeroGPU attaches a GPU per decorated call; importing spaces first makes torch report CUDA in
        # the main process, so models are placed on "cuda" at load time and run there inside gpu_task.
        import spaces  # noqa: F401
    if text in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise ValueError(f"device {text!r} is not a device name; use cpu, cuda, cuda:N or auto ({DEVICE_ENV})") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {text!r} was asked for, but this machine has no usable CUDA GPU; "
                             f"set {DEVICE_ENV}=cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {text!r} does not exist: this machine has {torch.cuda.device_count()} "
                             "CUDA GPU(s), numbered from 0")
    elif device.type != "cpu":
        raise ValueError(f"device {text!r} is not supported; use cpu, cuda, cuda:N or auto ({DEVICE_ENV})")
    return device


def default_dtype(device: str | torch.device) -> torch.dtype:
    """float32 on the CPU (CPU half-precision matmuls are slow and the bundled model is small);
    bfloat16 on a GPU that supports it (its range holds LLaVA's activations), else float16."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def on_space() -> bool:
    """Whether this process runs on a Hugging Face Space (the platform sets ``SPACE_ID``)."""
    return bool(os.environ.get("SPACE_ID"))


def on_zero_gpu() -> bool:
    """Whether this Space has ZeroGPU hardware (the platform sets ``SPACES_ZERO_GPU=true``)."""
    return os.environ.get("SPACES_ZERO_GPU", "").strip().lower() in ("1", "t", "true")


def gpu_task(duration_s: int) -> Callable[[F], F]:
    """Decorator for a function that needs the GPU for up to ``duration_s`` seconds.

    On a Space it is ``spaces.GPU(duration=duration_s)``: on ZeroGPU hardware that attaches a GPU
    for the call (and queues the call until one is free); on other Space hardware ``spaces`` makes it
    a no-op. Outside Spaces, or where the ``spaces`` package is absent on non-ZeroGPU hardware, it
    returns the function unchanged. On ZeroGPU without ``spaces`` there would be no GPU at all, so
    that case raises ImportError at decoration time rather than running silently on the CPU.
    """
    if duration_s <= 0:
        raise ValueError(f"gpu_task duration must be a positive number of seconds, got {duration_s!r}")
    if on_space():
        try:
            import spaces
        except ImportError:
            if on_zero_gpu():
                raise ImportError("this ZeroGPU Space needs the 'spaces' package (pip install spaces)") from None
        else:
            return spaces.GPU(duration=duration_s)

    def unchanged(fn: F) -> F:
        return fn

    return unchanged
