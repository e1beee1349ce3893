"""An integer execution path for packed Linears: one int8 x int8 -> int32 matmul plus a rescale.

Why: a :class:`PackedLinear` fake-quantizes its input and multiplies in floating point, so a
quantized model answers *slower* than the FP one on a CPU. When the weight has one (step, zero point)
per output channel and the input one per token row (a static range per tensor or per token
position, or a dynamic one per row), both steps factor out of the sum over input channels i:

    y[t, o] = s_x[t] s_w[o] (sum_i qx qw - z_x sum_i qw - z_w sum_i qx + K z_x z_w) + b[o]

with unsigned codes qx, qw and integer zero points z_x, z_w (the grid of
:mod:`qvlm.quant.quantizers`). The sum runs on ``torch._int_mm`` (int8 dot-product instructions:
AVX512-VNNI, or AMX where the CPU has it).
Codes are shifted into int8 (8 bits: q - 128; up to 7 bits they fit as they are) and the shift is
folded into the zero points, which leaves the formula unchanged.

``torch._int_mm`` on the CPU (torch 2.13, checked in ``tests/quant/test_integer.py``): both operands int8
(a uint8 second operand raises), 2-D only, any M, K, N (no padding needed, unlike CUDA's M > 16 and
multiples of 8, which are not handled here), int32 accumulator: exact while K * 128 * 128 < 2**31, so
longer rows are summed in chunks. On other devices the sum runs as a float64 matmul: exact (K * 2**14 < 2**53)
but not fast.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import weakref

import torch
from torch import nn

from qvlm.models import VLMHandle, build_layer_map
from qvlm.quant.kernels import (
    ACCUMULATORS,
    KernelChoice,
    Timer,
    cached_choice,
    choose,
    env_choice,
    kernel_policy,
    layer_signature,
    remember_choice,
)
from qvlm.quant.memory import dequantized_bytes, fp_model_bytes, resident_bytes
from qvlm.quant.packing import PackedLinear, unpack_bits
from qvlm.quant.qlinear import QuantLinear, replace_module
from qvlm.quant.quantizers import DYNAMIC_TOKEN, act_codes, dynamic_grid, qmax_of

ACT_MODES = ("tensor", "token", "dynamic")
"""Activation grids the integer path takes: a static range per tensor or per token position (the
:class:`ActQuantizer` granularities), or a range from each row's min/max at run time."""

ON_INTEGER_KERNELS = "integer kernels"
ON_FLOAT_KERNELS = "float kernels (weights dequantized once)"
SIMULATED = "simulated"
FLOATING_POINT = "floating point"

MEMORY_CAPS = ("fp", "packed", "unlimited")
"""How much a quantized model may hold while it answers (``$QVLM_MEMORY``, :func:`hold_within_cap`): at most its FP
model's bytes (default), its packed codes only, or whatever its fastest kernels hold."""
CAP_WORDS = {"fp": "the bytes its FP model holds", "packed": "its packed codes", "unlimited": "no limit"}


# ----------------------------------------------------------------------------------------------
# pure functions
# ----------------------------------------------------------------------------------------------
def code_offset(bits: int) -> int:
    """What is subtracted from b-bit unsigned codes to fit int8: 128 at 8 bits, 0 below."""
    if not 1 <= bits <= 8:
        raise ValueError(f"the integer path takes 1 to 8 bits, got {bits}")
    return 128 if bits == 8 else 0


def correction_dtype(k: int, bits_x: int, bits_w: int) -> torch.dtype:
    """int32 when no partial sum of :func:`rescale`'s integer terms can overflow it, else int64.

    With unsigned activation codes qx, z_x <= Q_x = 2^bx - 1 and shifted weight codes and zero points
    |aw|, |z_w| <= A_w: each of |acc|, |z_x sum_i aw|, |z_w sum_i (qx - z_x)| is at most K Q_x A_w.
    W8A8 stays int32 up to K = 21929 (LLaMA-7B's widest row is 11008).
    """
    reach_w = max(code_offset(bits_w), qmax_of(bits_w) - code_offset(bits_w))
    bound = 3 * k * qmax_of(bits_x) * reach_w
    return torch.int32 if bound < 2**31 else torch.int64


def rescale(acc: torch.Tensor, sum_x: torch.Tensor, zero_x: torch.Tensor, sum_w: torch.Tensor,
            zero_w: torch.Tensor, k: int, scale_x: torch.Tensor, scale_w: torch.Tensor,
            bias: torch.Tensor | None, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """y [M, N] float32 = s_x[t] s_w[o] (acc - z_x sum_i aw - z_w sum_i ax + K z_x z_w) + b[o].

    acc: [M, N] sum_i ax aw of the codes (activation codes unsigned, weight codes shifted; an integer
    tensor, or float32 holding whole numbers); sum_x [M], sum_w [N]: their row sums; zero_x [M],
    zero_w [N]: the zero points on the same codes; scale_x [M], scale_w [N] float32. The bracket is
    computed exactly in ``dtype`` (:func:`correction_dtype`), written as
    acc - z_x sum_i aw - z_w sum_i (ax - z_x), then rounded once to float32.
    """
    zero_x, zero_w = zero_x.to(dtype), zero_w.to(dtype)
    centred_x = sum_x.to(dtype) - k * zero_x                       # sum_i (qx - z_x), [M]
    exact = acc.to(dtype) - zero_x.unsqueeze(1) * sum_w.to(dtype) - centred_x.unsqueeze(1) * zero_w
    y = exact.float().mul_(scale_x.float().unsqueeze(1)).mul_(scale_w.float())
    return y if bias is None else y.add_(bias.float())


def refusal(packed: nn.Module, dynamic: bool = False, act_bits: int | None = None) -> str | None:
    """Why ``packed`` cannot run on integer kernels, or None when it can.

    ``dynamic``: take the input's range from each row at run time instead of its static ranges
    (then ``act_bits``, default the layer's activation bits, sets the grid).
    """
    if not isinstance(packed, PackedLinear):
        return f"{type(packed).__name__} is not a PackedLinear (weights fake-quantized, not packed)"
    if packed.fmt != "uniform":
        return "NormalFloat weights: a level table, no per-channel step to factor out of the sum"
    if packed.bits > 8:
        return f"{packed.bits}-bit weights do not fit int8"
    if packed.group < packed.in_features:
        return (f"grouped weights (group {packed.group} < row {packed.in_features}): "
                "the step changes inside the sum over input channels")
    act = packed.act
    if dynamic or takes_dynamic_ranges(act):
        bits = act_bits if act_bits is not None else (act.bits if act is not None else None)
        if bits is None:
            return "weight-only layer and no activation bit-width given for the dynamic grid"
        return None if 1 <= bits <= 8 else f"{bits}-bit activations do not fit int8"
    if act is None or not act.enabled:
        return "the input is not quantized (weight-only)"
    if not act.calibrated or act.log_hi is not None:
        return "the activation ranges are not calibrated and frozen yet"
    if act.bits > 8:
        return f"{act.bits}-bit activations do not fit int8"
    if act.granularity == "channel":
        return "per-input-channel activation ranges: the step changes inside the sum over input channels"
    return None


def takes_dynamic_ranges(act: nn.Module | None) -> bool:
    """Whether ``act`` quantizes each token row on its own range, taken at run time (:data:`DYNAMIC_TOKEN`)."""
    return act is not None and act.enabled and act.granularity == DYNAMIC_TOKEN


# ----------------------------------------------------------------------------------------------
# the module
# ----------------------------------------------------------------------------------------------
class IntegerLinear(nn.Module):
    """A quantized Linear that runs as one integer accumulation + :func:`rescale` (inference only, no gradient).

    The accumulation runs on ``accumulator``, one of :data:`qvlm.quant.kernels.ACCUMULATORS` (fbgemm, oneDNN,
    ``torch._int_mm``, float32 of the codes), chosen by timing on the machine (:func:`use_integer_kernels`).

    Build it with :meth:`from_packed`. Buffers: ``codes`` [out, in] int8 (weight codes minus
    :func:`code_offset`: 1 byte per weight, held once; at W4 that is twice the packed stream, because
    ``torch._int_mm`` reads int8 only), ``w_scale`` [out] float32, ``w_zero`` [out] int32 (shifted),
    ``w_sum`` [out] int32 (sum_i of shifted codes); for static grids ``act_scale`` / ``act_zero``
    [G] (G = 1 per tensor, T per token position; zero points unshifted, as in :class:`ActQuantizer`);
    ``smooth`` (AWQ's divisor, applied before quantizing, as :class:`PackedLinear` does); ``act_clip`` (the
    dynamic grid's clip factor, :meth:`ActQuantizer.set_clip`; None: each row's own min/max).
    """

    weight_quantized = True
    w_format = "uniform"

    def __init__(self, codes: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor, w_bits: int,
                 bias: torch.Tensor | None, act_bits: int, act_mode: str, act_scale: torch.Tensor | None,
                 act_zero: torch.Tensor | None, smooth: torch.Tensor | None, dtype: torch.dtype,
                 tower: str = "", role: str = "", accumulator: str = "int_mm",
                 rotation: torch.Tensor | None = None, act_clip: torch.Tensor | None = None) -> None:
        super().__init__()
        if act_mode not in ACT_MODES:
            raise ValueError(f"unknown activation mode {act_mode!r}; expected one of {ACT_MODES}")
        if accumulator not in ACCUMULATORS:
            raise ValueError(f"unknown accumulator {accumulator!r}; expected one of {', '.join(ACCUMULATORS)}")
        self.out_features, self.in_features = codes.shape
        self.w_bits, self.a_bits, self.act_mode = w_bits, act_bits, act_mode
        self.w_group = self.in_features
        self.compute_dtype = dtype
        self.tower, self.role = tower, role
        offset = code_offset(w_bits)
        shifted = (codes.to(torch.int32) - offset).to(torch.int8).contiguous()
        self.register_buffer("codes", shifted)
        self.register_buffer("w_scale", w_scale.float().reshape(-1))
        self.register_buffer("w_zero", w_zero.to(torch.int32).reshape(-1) - offset)
        self.register_buffer("w_sum", shifted.sum(dim=1, dtype=torch.int32))
        self.register_buffer("act_scale", None if act_scale is None else act_scale.float().reshape(-1))
        self.register_buffer("act_zero", None if act_zero is None else act_zero.to(torch.int32).reshape(-1))
        self.register_buffer("smooth", None if smooth is None else smooth.detach().float())
        self.register_buffer("rotation", None if rotation is None else rotation.detach().float())
        self.register_buffer("act_clip", None if act_clip is None else act_clip.detach().float().reshape(()))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.sum_dtype = correction_dtype(self.in_features, act_bits, w_bits)
        self.accumulator = accumulator
        self._accumulate = ACCUMULATORS[accumulator].run
        self._state = ACCUMULATORS[accumulator].prepare(self.codes, self.w_sum, act_bits)

    @classmethod
    def from_packed(cls, packed: PackedLinear, dynamic: bool = False, act_bits: int | None = None,
                    accumulator: str = "int_mm") -> "IntegerLinear | None":
        """The integer form of ``packed``, or None when its format does not factor (:func:`refusal` says why)."""
        if refusal(packed, dynamic, act_bits) is not None:
            return None
        shape = (packed.out_features, packed.in_features)
        codes = unpack_bits(packed.packed, packed.bits, shape[0] * shape[1]).reshape(shape)
        act = packed.act
        clip = None
        if dynamic or takes_dynamic_ranges(act):
            bits = act_bits if act_bits is not None else act.bits
            mode, a_scale, a_zero = "dynamic", None, None
            clip = act.clip if takes_dynamic_ranges(act) else None  # a static layer run dynamically: rows' own ranges
        else:
            bits, mode = act.bits, act.granularity
            a_scale, a_zero = act.grid()
        layer = cls(codes, packed.scale, packed.zero, packed.bits, packed.bias, bits, mode, a_scale, a_zero,
                    packed.smooth, packed.compute_dtype, packed.tower, packed.role, accumulator,
                    None if act is None else act.rotation, clip)
        return layer.to(packed.packed.device)

    def row_grid(self, x: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(step [M], zero point [M]) of each row of ``rows`` [M, K] (``x`` [..., T, K] flattened)."""
        m = rows.shape[0]
        if self.act_mode == "dynamic":
            return dynamic_grid(rows, self.a_bits, self.act_clip)
        if self.act_mode == "tensor":
            return self.act_scale.expand(m), self.act_zero.expand(m)
        t = x.shape[-2] if x.dim() >= 2 else 1
        if x.dim() < 2 or t != self.act_scale.numel():
            raise ValueError(f"this layer's activation ranges were calibrated for {self.act_scale.numel()} "
                             f"token positions; the input has {t}")
        return self.act_scale.repeat(m // t), self.act_zero.repeat(m // t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth is not None:
            x = x / self.smooth.to(x.dtype)
        if self.rotation is not None:  # online, as the simulated layer's quantizer does: its codes are of x R
            x = x @ self.rotation.to(x.dtype)
        rows = x.reshape(-1, self.in_features)
        scale_x, zero_x = self.row_grid(x, rows)
        codes_x = act_codes(rows, scale_x.unsqueeze(1), zero_x.unsqueeze(1), self.a_bits)  # unsigned, float32
        acc = self._accumulate(self._state, codes_x)
        sum_x = codes_x.sum(dim=1, dtype=torch.float64)  # whole numbers below 2^53: exact
        y = rescale(acc, sum_x, zero_x, self.w_sum, self.w_zero, self.in_features, scale_x, self.w_scale,
                    self.bias, self.sum_dtype)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight [out, in] in the compute dtype: (codes - zero) * step, the packed layer's floats."""
        w = (self.codes.float() - self.w_zero.float().unsqueeze(1)) * self.w_scale.unsqueeze(1)
        return w.to(self.compute_dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, for code that reads ``.weight`` (shape/dtype/device checks)."""
        return self.dequantized_weight()

    def storage_bytes(self) -> int:
        """Bytes held for the weight: int8 codes + per-channel step, zero point and code sum."""
        tensors = (self.codes, self.w_scale, self.w_zero, self.w_sum)
        return sum(t.numel() * t.element_size() for t in tensors)

    def extra_repr(self) -> str:
        return (f"{self.in_features}->{self.out_features}, W{self.w_bits}A{self.a_bits} on {self.accumulator}, "
                f"activations {self.act_mode} ({self.storage_bytes()} bytes), tower={self.tower}, role={self.role}")


# ----------------------------------------------------------------------------------------------
# whole models
# ----------------------------------------------------------------------------------------------
def choose_kernel(module: PackedLinear, dynamic: bool = False, policy: str | None = None,
                  timer: Timer | None = None) -> KernelChoice:
    """The measured backend of one packed layer (:func:`qvlm.quant.kernels.choose`), from the cache when this
    machine has timed a layer like it before."""
    policy = policy or kernel_policy()
    why = refusal(module, dynamic)
    signature = layer_signature(module) + ("/dynamic" if dynamic else "")
    if timer is None:
        held = cached_choice(signature, policy)
        if held is not None and (held.backend not in ACCUMULATORS or why is None):
            return held
    choice = choose(module, lambda name: IntegerLinear.from_packed(module, dynamic, accumulator=name), why,
                    policy, timer)
    if timer is None:
        remember_choice(signature, policy, choice)
    return choice


def to_integer_path(model: nn.Module, dynamic: bool = False, policy: str | None = None,
                    timer: Timer | None = None, cap: str | None = None) -> dict:
    """Give every quantized Linear of ``model`` its measured backend, in place (:func:`choose_kernel`).

    Returns {"integer": [names], "simulated": {name: why not on integer kernels}, "backends": {name: backend},
    "choices": {layer signature: KernelChoice as a dict}} over the quantized Linears (packed or fake-quant; FP
    Linears such as the LM head are in none). An integer layer is swapped for an :class:`IntegerLinear`, a
    "float" one keeps its weight dequantized (:meth:`PackedLinear.hold_dequantized`) as far as ``cap`` allows
    (:func:`hold_within_cap`, default ``$QVLM_MEMORY``; its report is "memory"). With ``dynamic`` the
    swapped layers take per-row ranges at run time, so their outputs differ from the simulated model's.
    """
    integer, simulated, backends, choices = [], {}, {}, {}
    wanted: dict[str, tuple[PackedLinear, KernelChoice]] = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            backends[name] = SIMULATED
            simulated[name] = refusal(module, dynamic) or "fake-quantized, not packed"
            continue
        if not isinstance(module, PackedLinear):
            continue
        choice = choose_kernel(module, dynamic, policy, timer)
        choices[layer_signature(module)] = choice.to_dict()
        backends[name] = choice.backend
        if choice.integer:
            replace_module(model, name, IntegerLinear.from_packed(module, dynamic, accumulator=choice.backend))
            integer.append(name)
            continue
        module.hold_dequantized(False)
        if choice.backend == "float":
            wanted[name] = (module, choice)
        simulated[name] = refusal(module, dynamic) or choice.reason
    memory = hold_within_cap(model, wanted, cap or memory_cap())
    for name in wanted:
        if name in memory["not_held"]:
            backends[name] = SIMULATED
            why = refusal(wanted[name][0], dynamic)
            simulated[name] = f"{why}; {memory['not_held'][name]}" if why else memory["not_held"][name]
    return {"integer": integer, "simulated": simulated, "backends": backends, "choices": choices, "memory": memory}


def memory_cap() -> str:
    """``$QVLM_MEMORY`` (:data:`MEMORY_CAPS`; default "fp")."""
    return env_choice("QVLM_MEMORY", MEMORY_CAPS, "fp")


def hold_within_cap(model: nn.Module, wanted: dict[str, tuple[PackedLinear, KernelChoice]], cap: str) -> dict:
    """Hold the dequantized weight of the ``wanted`` layers (those whose fastest path is "float") as far as ``cap``
    allows; the others decode in every call. Returns {"cap", "budget", "held_bytes", "not_held": {name: why}}.

    "fp": the model as it answers may hold at most what its FP model holds (:func:`fp_model_bytes`); the layers
    that save the most time per byte held go first (time from the choice's scores: simulated minus float).
    "packed": nothing held, the weights stay codes (4 bits per weight at W4). "unlimited": every wanted layer.
    """
    if cap not in MEMORY_CAPS:
        raise ValueError(f"unknown memory cap {cap!r}; expected one of {', '.join(MEMORY_CAPS)}")
    for module, _ in wanted.values():  # measured and decided from nothing held
        module.hold_dequantized(False)
    cost = {n: dequantized_bytes(m) for n, (m, _) in wanted.items()}
    budget = {"unlimited": sum(cost.values()), "packed": 0}.get(cap)
    if budget is None:
        budget = max(0, fp_model_bytes(model) - resident_bytes(model))

    def saved_per_byte(name: str) -> float:
        scores = wanted[name][1].scores
        return (scores.get(SIMULATED, 0.0) - scores.get("float", 0.0)) / max(cost[name], 1)

    held, not_held = 0, {}
    for name in sorted(wanted, key=saved_per_byte, reverse=True):
        if held + cost[name] <= budget:
            wanted[name][0].hold_dequantized(True)
            held += cost[name]
        else:
            not_held[name] = (f"decoded in every call: a dequantized copy ({cost[name]:,} bytes) would take the model "
                              f"past {CAP_WORDS[cap]} ($QVLM_MEMORY={cap})")
    return {"cap": cap, "budget": budget, "held_bytes": held, "not_held": not_held}


def execution_path(model: nn.Module) -> str:
    """How ``model``'s quantized Linears run: "integer kernels (fbgemm)", "float kernels (...)", "simulated",
    "mixed: ..." (counts per backend); "floating point" for a model that has none."""
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, IntegerLinear):
            key = m.accumulator
        elif isinstance(m, PackedLinear):
            key = "float" if m.dequantized is not None else SIMULATED
        elif isinstance(m, QuantLinear):
            key = SIMULATED
        else:
            continue
        counts[key] = counts.get(key, 0) + 1
    total = sum(counts.values())
    if total == 0:
        return FLOATING_POINT
    n_integer = sum(c for k, c in counts.items() if k in ACCUMULATORS)
    used = [k for k in counts if k in ACCUMULATORS]
    on = ", ".join(f"{k} {counts[k]}" if len(used) > 1 else k for k in used)
    if n_integer == total:
        return f"{ON_INTEGER_KERNELS} ({on})"
    if counts.get("float") == total:
        return ON_FLOAT_KERNELS
    if counts.get(SIMULATED) == total:
        return SIMULATED
    parts = ([f"{n_integer} on {ON_INTEGER_KERNELS} ({on})"] if n_integer else []) + \
            [f"{counts[k]} {label}" for k, label in (("float", "float (weights dequantized once)"),
                                                     (SIMULATED, SIMULATED)) if counts.get(k)]
    return f"mixed: {', '.join(parts)}, of {total} Linears"


def use_integer_kernels(handle: VLMHandle) -> dict:
    """Run ``handle``'s quantized Linears on their measured backends from now on (integer kernels where the format
    factors and they are faster), in place; record the path on the handle.

    Returns :func:`to_integer_path`'s report plus "path" (:func:`execution_path`), which is also set as
    ``handle.execution_path`` (the reasons as ``handle.simulated_layers``). Why after quantizing and not
    inside it: VEO and CDM train through the fake-quant layers; a finished model only answers. The
    exporters and :func:`~qvlm.quant.memory.weight_memory` read PackedLinears, so a model that may still
    be saved or measured answers through :func:`integer_handle` instead. Off the CPU nothing is swapped:
    the accumulators are CPU kernels (``torch._int_mm`` on CUDA is not among the candidates yet).
    """
    device = next(handle.model.parameters()).device
    if device.type != "cpu":
        reason = f"integer kernels run on the CPU; this model is on {device.type}"
        report = {"integer": [], "simulated": {n: reason for n, m in handle.model.named_modules()
                                               if isinstance(m, (PackedLinear, QuantLinear))}}
    else:
        report = to_integer_path(handle.model)
        handle.layer_map = build_layer_map(handle.model)  # its entries hold the Linears just replaced
    report["path"] = execution_path(handle.model)
    handle.execution_path, handle.simulated_layers = report["path"], dict(report["simulated"])
    return report


_INTEGER_HANDLES: "weakref.WeakKeyDictionary[nn.Module, VLMHandle]" = weakref.WeakKeyDictionary()
_NO_INTEGER_LAYERS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_INTEGER_HANDLES_LOCK = threading.Lock()


def integer_handle(handle: VLMHandle) -> VLMHandle:
    """A handle on a copy of ``handle``'s model that answers on its measured kernels (:func:`use_integer_kernels`).

    The copy shares every parameter and buffer with the original, which stays as it is (packed: the
    exporters and weight memory read it); only what the chosen backends hold is new (int8 codes, 1 byte per
    weight, or a dequantized weight). Built once per model and kept while the model lives, so answering again
    costs nothing.
    """
    with _INTEGER_HANDLES_LOCK:
        model = handle.model
        if model in _NO_INTEGER_LAYERS:  # asked at every answer: the scan below runs once per model
            return handle
        held = _INTEGER_HANDLES.get(model)
        if held is not None:
            return held
        if not any(isinstance(m, PackedLinear) for m in model.modules()):  # nothing packed: no copy
            _NO_INTEGER_LAYERS.add(model)  # a weak set: it does not keep the variant alive
            return handle
        shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
        clone = copy.deepcopy(model, memo=shared)
        answering = dataclasses.replace(handle, model=clone, layer_map=build_layer_map(clone))
        use_integer_kernels(answering)
        _INTEGER_HANDLES[model] = answering
        return answering
