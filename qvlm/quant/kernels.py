"""Which kernel runs each quantized Linear: the candidates are timed on the machine that answers, and checked.

Why measured and not assumed: the same int8 kernel is 3x faster than float32 on one CPU and 15x slower on
another. ``torch._int_mm`` on a 2-core AMD EPYC with AVX2 only (no VNNI, torch 2.13, one thread) took 288 ms
for a [2500, 192] x [192, 576] product that float32 does in 15 ms, while fbgemm's int8 GEMM did it in 15 ms
and a [16, 4096] x [4096, 4096] one in 14 ms against float32's 27 ms. A Space, a lab server and this project's
own machines get different CPUs; which one is not the user's choice.

The candidates for one layer:

- ``simulated``: :class:`~qvlm.quant.packing.PackedLinear` as it is, weights dequantized in every call
  (the least memory: the packed codes only);
- ``float``: the same layer with its weight dequantized once (:meth:`PackedLinear.hold_dequantized`):
  the simulated arithmetic exactly, float32 GEMM speed, the weight held in the compute dtype;
- an integer accumulator (:data:`ACCUMULATORS`: ``fbgemm``, ``onednn``, ``int_mm``, ``float-codes``)
  under :class:`~qvlm.quant.integer.IntegerLinear`, for layers whose grid factors out of the sum
  (:func:`~qvlm.quant.integer.refusal`).

Every accumulator computes the same integers, acc[m, n] = sum_i qx[m, i] aw[n, i] (unsigned activation codes
times shifted weight codes), and is first checked against an exact int64 sum on random and worst-case codes
of the layer's own bit-widths: fbgemm and oneDNN on AVX2 multiply through 16-bit pair sums that saturate for
8-bit activations (255 * 127 * 2 > 2^15; on VNNI they do not), so there the check, not a rule, rules them out.
A float32 result may round once where |acc| > 2^24 (long rows of 8-bit codes): "within rounding" is a relative
2^-23.

The choice: the smallest time per row, summed over a decode-sized and a prefill-sized input
(:data:`TIMING_ROWS`), among the float paths and the integer candidates that passed the check; the FP
``nn.Linear`` of that shape is timed beside them, so the choice says how it compares (at small widths every
quantized path is slower than it: quantizing a row of activations costs more than its product, and an integer
kernel that beats the float path is then still the faster and smaller choice). Choices are cached per CPU model, instruction-set
flags, torch version and thread count (:func:`machine_key`) in ``$QVLM_KERNEL_CACHE`` (default
``~/.cache/qvlm/kernels.json``), so a model loads with no timing the second time.

Speed is not the only cost: the ``float`` path holds a dequantized weight in the compute dtype (float32 on a CPU,
8x the bytes of W4 codes). :func:`qvlm.quant.integer.hold_within_cap` grants those copies only within
``$QVLM_MEMORY`` ("fp", the default: the model as it answers holds no more than its FP model would; "packed": none,
the weights stay codes; "unlimited"), the layers that save the most time per byte first.

``$QVLM_KERNELS`` overrides the choice: ``measure`` (default), ``integer`` (the fastest integer candidate
wherever a layer's grid factors, even if float32 is faster: to see the path, and in tests), ``float``,
``simulated``. To reproduce an AVX2-only CPU on a newer one, set before starting Python:
``FBGEMM_ENABLE_INSTRUCTIONS=AVX2`` (fbgemm's dispatch, ``fbgemmEnvGetIsa`` in fbgemm's Utils.cc),
``ONEDNN_MAX_CPU_ISA=AVX2`` (oneDNN's) and ``ATEN_CPU_CAPABILITY=avx2`` (torch's own vectorised kernels). They are
part of :func:`machine_key`, so a capped run never reuses an uncapped run's choices. (Read from the libraries'
sources and documentation; not yet run on a VNNI machine by this project.)
"""

from __future__ import annotations

import copy
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn


MAX_INT_MM_K = (1 << 31) // (128 * 128) - 1
"""Longest row one ``torch._int_mm`` call sums exactly in its int32 accumulator (131071)."""

TIMING_ROWS = (16, 256)
"""Rows of the two inputs a candidate is timed on: a decode step of a small batch, a prefill of a few
prompts. The score is the sum of the two times per row, so neither regime hides the other."""

SHORTLIST = 3.0
"""A candidate more than this many times slower than the FP Linear on the small input is rejected without being
timed on the large one (``torch._int_mm`` on AVX2 at SigLIP widths would otherwise take seconds per shape)."""

POLICIES = ("measure", "integer", "float", "simulated")
FLOAT_PATHS = ("float", "simulated")
ISA_CAPS = ("FBGEMM_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
"""Environment variables that cap which instructions the kernels use (see the module docstring)."""
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "avx_vnni")


# ----------------------------------------------------------------------------------------------
# the accumulators
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Accumulator:
    """One way to compute acc = sum_i qx[m, i] aw[n, i]: qx unsigned activation codes (float32 [M, K] of
    whole numbers), aw the layer's shifted weight codes (int8 [N, K]); the result [M, N] is int32, int64 or
    float32 (whole numbers, rounded once above 2^24)."""

    name: str
    label: str
    unavailable: Callable[[], str | None]
    """Why this machine cannot run it, or None."""
    prepare: Callable[[torch.Tensor, torch.Tensor, int], Any]
    """(weight codes int8 [N, K], their row sums int32 [N], activation bits) -> the state :attr:`run` takes."""
    run: Callable[[Any, torch.Tensor], torch.Tensor]


def _quantized_engine(name: str) -> str | None:
    engines = torch.backends.quantized.supported_engines
    return None if name in engines else f"this torch build has no {name} engine ({', '.join(engines)})"


def _on_engine(name: str, make: Callable[[], Any]) -> Any:
    """``make()`` with torch's quantized engine set to ``name``: a prepacked weight keeps the engine it was packed
    for, so only the packing needs it."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        return make()
    finally:
        torch.backends.quantized.engine = previous


def _fbgemm_prepare(codes: torch.Tensor, _sums: torch.Tensor, _bits: int) -> Any:
    n = codes.shape[0]
    weight = torch._make_per_channel_quantized_tensor(codes.cpu(), torch.ones(n, dtype=torch.double),
                                                      torch.zeros(n, dtype=torch.long), 0)
    return _on_engine("fbgemm", lambda: torch.ops.quantized.linear_prepack(weight, None))


def _fbgemm_run(state: Any, codes_x: torch.Tensor) -> torch.Tensor:
    # unit steps and zero points: the op's own quantize step returns the codes, its output is the int32 sum
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(codes_x, 1.0, 0, state)


def _onednn_prepare(codes: torch.Tensor, _sums: torch.Tensor, _bits: int) -> Any:
    n = codes.shape[0]
    return (torch.ops.onednn.qlinear_prepack(codes.cpu(), None), torch.ones(n), torch.zeros(n, dtype=torch.long))


def _onednn_run(state: Any, codes_x: torch.Tensor) -> torch.Tensor:
    packed, ones, zeros = state
    return torch.ops.onednn.qlinear_pointwise(codes_x.to(torch.uint8), 1.0, 0, packed, ones, zeros, None, 1.0, 0,
                                              torch.float32, "none", [], "")


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact sum_i a[m, i] b[n, i]: [M, N] int32 (int64 when K > :data:`MAX_INT_MM_K`) from int8 a [M, K], b [N, K].

    ``torch._int_mm`` on the CPU (both operands int8, 2-D, any shape); longer rows in chunks summed in int64;
    other devices: float64 matmul (exact, not fast).
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise ValueError(f"int_matmul takes int8 operands, got {a.dtype} and {b.dtype}")
    if a.device.type != "cpu":
        return (a.double() @ b.double().t()).to(torch.int64)
    k = a.shape[1]
    if k <= MAX_INT_MM_K:
        return torch._int_mm(a, b.t())
    total = torch.zeros(a.shape[0], b.shape[0], dtype=torch.int64)
    for start in range(0, k, MAX_INT_MM_K):
        part = slice(start, start + MAX_INT_MM_K)
        total += torch._int_mm(a[:, part].contiguous(), b[:, part].t())
    return total


def _int_mm_prepare(codes: torch.Tensor, sums: torch.Tensor, bits: int) -> Any:
    return codes, sums, 128 if bits == 8 else 0


def _int_mm_run(state: Any, codes_x: torch.Tensor) -> torch.Tensor:
    codes, sums, offset = state  # 8-bit codes do not fit int8: shifted by 128, and the shift added back
    acc = int_matmul((codes_x - offset).to(torch.int8), codes)
    return acc if offset == 0 else acc + offset * sums.to(acc.dtype)


def _float_codes_prepare(codes: torch.Tensor, _sums: torch.Tensor, _bits: int) -> Any:
    return codes.float()


def _float_codes_run(state: Any, codes_x: torch.Tensor) -> torch.Tensor:
    return codes_x @ state.t()


def _available() -> None:
    return None


ACCUMULATORS: dict[str, Accumulator] = {a.name: a for a in (
    Accumulator("fbgemm", "fbgemm int8 GEMM (x86)", lambda: _quantized_engine("fbgemm"), _fbgemm_prepare,
                _fbgemm_run),
    Accumulator("onednn", "oneDNN int8 GEMM", lambda: _quantized_engine("onednn"), _onednn_prepare, _onednn_run),
    Accumulator("int_mm", "torch._int_mm", _available, _int_mm_prepare, _int_mm_run),
    Accumulator("float-codes", "float32 GEMM of the integer codes", _available, _float_codes_prepare,
                _float_codes_run),
)}
"""The integer accumulators, fastest first where the machine has them (the order breaks ties)."""


def accumulator_error(acc: Accumulator, codes_w: torch.Tensor, bits_x: int, rows: int = 24,
                      seed: int = 0, state: Any = None) -> str | None:
    """Why ``acc`` gets the sums of these weight codes wrong at ``bits_x``-bit activations, or None when it
    gets them right: random codes, the largest codes, and the largest against the weights' signs (where
    16-bit pair sums saturate) are compared with an exact int64 sum."""
    qmax = (1 << bits_x) - 1
    g = torch.Generator().manual_seed(seed)
    codes_x = torch.randint(0, qmax + 1, (rows, codes_w.shape[1]), generator=g).float()
    codes_x[0] = qmax
    codes_x[1] = torch.where(codes_w[0] > 0, qmax, 0).float()  # every product of row 0 positive and large
    sums = codes_w.sum(dim=1, dtype=torch.int32)
    try:
        got = acc.run(acc.prepare(codes_w, sums, bits_x) if state is None else state, codes_x).to(torch.float64)
    except (RuntimeError, ValueError, NotImplementedError) as err:
        return f"{acc.name} failed on this machine ({str(err).splitlines()[0][:120]})"
    exact = (codes_x.to(torch.int64) @ codes_w.to(torch.int64).t()).to(torch.float64)
    worst = float(((got - exact).abs() - exact.abs() * 2.0**-23).max())
    if worst > 0:
        return f"{acc.name} misses the exact sums by up to {float((got - exact).abs().max()):.0f} at {bits_x}-bit activations"
    return None


# ----------------------------------------------------------------------------------------------
# the choice
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelChoice:
    """What runs one layer, and the measurements it was chosen on (seconds per row, :data:`TIMING_ROWS`)."""

    backend: str
    """"float", "simulated", or an :data:`ACCUMULATORS` name."""
    reason: str
    scores: dict[str, float] = field(default_factory=dict)
    """candidate -> seconds per row summed over the timing inputs; a candidate that failed its check is absent."""
    fp_score: float | None = None
    """The FP ``nn.Linear`` of the same shape, timed alike."""
    rejected: dict[str, str] = field(default_factory=dict)
    """candidate -> why it was not timed (unavailable, wrong sums, the layer's grid does not factor)."""

    @property
    def integer(self) -> bool:
        return self.backend in ACCUMULATORS

    def to_dict(self) -> dict:
        return {"backend": self.backend, "reason": self.reason, "scores": self.scores, "fp_score": self.fp_score,
                "rejected": self.rejected}

    @classmethod
    def from_dict(cls, d: dict) -> "KernelChoice":
        return cls(d["backend"], d["reason"], dict(d.get("scores", {})), d.get("fp_score"), dict(d.get("rejected", {})))


Timer = Callable[[nn.Module, torch.Tensor], float]
"""(module, input) -> seconds one forward takes; injected by tests, :func:`time_forward` otherwise."""


def time_forward(module: nn.Module, x: torch.Tensor, min_seconds: float = 0.01, runs: int = 3) -> float:
    """The best of ``runs`` timed runs of ``module(x)`` after a warm-up, each repeated for ``min_seconds``."""
    with torch.inference_mode():
        module(x)
        best = float("inf")
        for _ in range(runs):
            n, start = 0, time.perf_counter()
            while True:
                module(x)
                n += 1
                elapsed = time.perf_counter() - start
                if elapsed >= min_seconds:
                    break
            best = min(best, elapsed / n)
    return best


def timing_inputs(layer: nn.Module) -> list[torch.Tensor]:
    """Inputs of :data:`TIMING_ROWS` rows for ``layer``: [B, T, K] with the calibrated T of a per-token-position
    grid, else [rows, 1, K]."""
    act = getattr(layer, "act", None)
    k = layer.in_features
    device = layer.packed.device if hasattr(layer, "packed") else next(layer.buffers()).device
    g = torch.Generator().manual_seed(0)
    inputs = []
    for rows in TIMING_ROWS:
        if act is not None and act.granularity == "token" and act.calibrated:
            t = act.lo.numel()
            shape = (max(1, -(-rows // t)), t, k)
        else:
            shape = (rows, 1, k)
        inputs.append(torch.randn(*shape, generator=g).to(device))
    return inputs


def score(module: nn.Module, inputs: list[torch.Tensor], timer: Timer) -> float:
    return sum(timer(module, x) / (x.numel() // x.shape[-1]) for x in inputs)


def choose(layer: nn.Module, build_integer: Callable[[str], nn.Module | None], integer_refusal: str | None,
           policy: str = "measure", timer: Timer | None = None) -> KernelChoice:
    """The backend for ``layer`` (a PackedLinear) under ``policy``.

    ``build_integer(name)``: the layer as an IntegerLinear on accumulator ``name`` (None if it cannot be
    built); ``integer_refusal``: why the layer's grid does not factor (then only the float paths compete).
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown kernel policy {policy!r}; expected one of {', '.join(POLICIES)}")
    if policy in FLOAT_PATHS:
        return KernelChoice(policy, f"$QVLM_KERNELS={policy}")
    timer = timer or time_forward
    inputs = timing_inputs(layer)
    rejected: dict[str, str] = {}
    candidates: dict[str, nn.Module] = {}
    if integer_refusal is not None:
        rejected.update({name: integer_refusal for name in ACCUMULATORS})
    else:
        for name, acc in ACCUMULATORS.items():
            why = acc.unavailable()
            module = None if why else build_integer(name)
            if why is None and module is None:
                why = "the layer cannot be built on it"
            if why is None:
                why = accumulator_error(acc, module.codes, module.a_bits, state=module._state)
            if why is None:
                candidates[name] = module
            else:
                rejected[name] = why
    fp = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None).to(inputs[0].device)
    fp_first = score(fp, inputs[:1], timer)
    fp_score = fp_first + score(fp, inputs[1:], timer)
    scores = {}
    for name, module in candidates.items():
        first = score(module, inputs[:1], timer)
        if policy == "measure" and first > SHORTLIST * fp_first:  # hopeless on the small input: not worth timing on the large one
            rejected[name] = (f"slower than float32 for this shape ({first / fp_first:.1f}x the FP Linear's time "
                              f"on {TIMING_ROWS[0]} rows)")
            continue
        scores[name] = first + score(module, inputs[1:], timer)
    if policy == "integer" and scores:
        best = min(scores, key=scores.get)
        return KernelChoice(best, "$QVLM_KERNELS=integer: the fastest integer kernel", scores, fp_score, rejected)
    for path in FLOAT_PATHS:
        scores[path] = score(_float_path(layer, path), inputs, timer)
    # The fastest exact candidate runs, integer or float path alike: where nothing beats the FP Linear (small
    # widths, where quantizing the activations costs more than the product), an integer kernel that beats the
    # float path is still the faster and the smaller choice (int8 codes, no dequantized float copy).
    best = min(scores, key=scores.get)
    for n in set(scores) & set(ACCUMULATORS) - {best}:
        rejected[n] = (f"slower than {best} for this shape ({scores[n] / fp_score:.2f}x the FP Linear's time, "
                       f"{best} {scores[best] / fp_score:.2f}x)")
    speed = f"{scores[best] / fp_score:.2f}x the FP Linear's time"
    reason = (f"fastest of {len(scores)} timed: {speed}" if best in ACCUMULATORS else
              f"no integer kernel beats the float path here; {best} is {speed}")
    return KernelChoice(best, reason, scores, fp_score, rejected)


def _float_path(layer: nn.Module, path: str) -> nn.Module:
    """A shallow twin of ``layer`` that runs ``path`` (its weight dequantized once, or in every call)."""
    twin = copy.copy(layer)
    twin._buffers = dict(layer._buffers)
    twin.hold_dequantized(path == "float")
    return twin


# ----------------------------------------------------------------------------------------------
# the cache
# ----------------------------------------------------------------------------------------------
def cpu_flags() -> list[str]:
    """The instruction-set flags of :data:`FLAGS` this CPU has (from /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    words = set(re.findall(r"\w+", text.split("\n\n")[0]))
    return [f for f in FLAGS if f in words]


def cpu_kind(flags: list[str] | None = None) -> str:
    """The class of CPU a speed figure holds for: "amx", "vnni" (int8 dot products: AVX512-VNNI or AVX-VNNI) or
    "avx2" (neither): the kinds ``benchmarks/results/table4-<kind>`` keeps apart."""
    flags = set(cpu_flags() if flags is None else flags)
    if "amx_int8" in flags:
        return "amx"
    return "vnni" if {"avx512_vnni", "avx_vnni"} & flags else "avx2"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


CHOICE_RULE = 2
"""Bumped when :func:`choose` decides differently, so a cache of the old rule's choices is not reused (2: the
fastest exact candidate runs; 1: an integer kernel had to beat the FP Linear, the float path not)."""


def machine_key() -> str:
    """What a measured choice holds for: CPU model, flags, torch version, thread count, ISA caps, choice rule."""
    caps = ",".join(f"{v}={os.environ[v]}" for v in ISA_CAPS if v in os.environ)
    return (f"{cpu_model()} | {' '.join(cpu_flags()) or 'no flags read'} | torch {torch.__version__} | "
            f"{torch.get_num_threads()} threads{' | ' + caps if caps else ''} | rule {CHOICE_RULE}")


def layer_signature(layer: nn.Module) -> str:
    """What a layer's timings depend on: its shape, bit-widths, formats and input path."""
    act = getattr(layer, "act", None)
    parts = [f"{layer.in_features}x{layer.out_features}", f"w{layer.bits}{layer.fmt}g{layer.group}",
             "a-" if act is None or not act.enabled else f"a{act.bits}{act.granularity}",
             "rot" if act is not None and act.rotation is not None else "",
             "smooth" if getattr(layer, "smooth", None) is not None else "",
             f"t{act.lo.numel()}" if act is not None and act.granularity == "token" and act.calibrated else ""]
    return "/".join(p for p in parts if p)


def cache_path() -> Path:
    return Path(os.environ.get("QVLM_KERNEL_CACHE") or Path.home() / ".cache" / "qvlm" / "kernels.json")


_CACHE_LOCK = threading.Lock()


def cached_choice(signature: str, policy: str) -> KernelChoice | None:
    try:
        data = json.loads(cache_path().read_text())
        return KernelChoice.from_dict(data[machine_key()][f"{policy}:{signature}"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remember_choice(signature: str, policy: str, choice: KernelChoice) -> None:
    """Add ``choice`` to the cache file (best effort: a read-only home only costs a new measurement)."""
    path = cache_path()
    with _CACHE_LOCK:
        try:
            data = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            data = {}
        data.setdefault(machine_key(), {})[f"{policy}:{signature}"] = choice.to_dict()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1))
            tmp.replace(path)
        except OSError:
            pass


def env_choice(name: str, allowed: tuple[str, ...], default: str) -> str:
    """``$name`` lower-cased (``default`` when unset or empty); ValueError naming the allowed values otherwise."""
    value = os.environ.get(name, default).strip().lower() or default
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(allowed)}")
    return value


def kernel_policy() -> str:
    return env_choice("QVLM_KERNELS", POLICIES, "measure")
