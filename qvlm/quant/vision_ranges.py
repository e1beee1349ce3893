"""Vision activation ranges that survive 4 bits: one rotation before the vision Linears, and the fold of
per-channel ranges into the LayerNorms (the third option, dynamic per-token ranges, is a granularity of
:class:`~qvlm.quant.quantizers.ActQuantizer`).

Why: post-LayerNorm activations of a ViT have strong per-channel scale differences, so one range per
token (or per tensor) spends its levels on the few large channels. Two ways around it:

* rotate (QuaRot, arXiv 2404.00456): y = (W Q)(Q^T x) with an orthogonal Q spreads the large channels
  over all of them, and the quantizer sees Q^T x (``QuantConfig.vision_rotation``);
* fold (RepQ-ViT, arXiv 2212.08254): keep per-channel ranges (step s_c, zero point z_c) while
  calibrating, then rewrite each one whose input is a LayerNorm output as one per-tensor range (s, z):

      r_c = s_c / s,   k_c = z - z_c (an integer),   delta_c = s_c k_c
      LayerNorm:          gamma' = gamma / r,   beta' = (beta - delta) / r
      consuming Linear:   W' = W diag(r),       b' = b + W' (s k)          (= b + W delta)

  so x' = (x - delta) / r and round(x'_c / s) + z = round(x_c / s_c) + z_c: the same codes, and
  W' x_hat' + b' = W x_hat + b (``QuantConfig.vision_fold_ranges``). The attention output (out_proj's
  input) folds the same way into v_proj's rows (attention rows sum to 1, so a per-channel shift of V
  is a shift of the output); fc2's input is post-GELU and cannot fold.

Order of the fold (why the folded weights are quantized again): the weights are quantized in the
layer-wise init and the ranges are final only after VEO, so the fold comes last (after every stage,
before ``measure``). Scaling the already-quantized columns by r_c would move them off their grid (no
longer packable at b bits), so each folded Linear is quantized again, in its format, from its FP weight
with the fold applied: Q(diag(1 / r_out) W diag(r_in)). Its rounding differs from the init's Q(W) like
AWQ's per-channel scaling does; the biases are computed from the new quantized weights, so the folded
layer is exactly a Linear with weight diag(r_out) Q(W') diag(1 / r_in) on the original quantized input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from qvlm.quant.qlinear import QuantLinear
from qvlm.quant.quantizers import ActQuantizer, qmax_of

if TYPE_CHECKING:
    from qvlm.models import LayerMap
    from qvlm.quant.run import QuantRun

ROTATIONS = ("none", "hadamard", "orthogonal")

ATTENTION_SITES: dict[str, tuple[tuple[str, str], ...]] = {"clip": (("v", "o"),)}
"""Per vision layer style: (producer, consumer) where the consumer's input is the attention output and
its channel c is the producer's output channel c (heads concatenated in order)."""

UNFOLDABLE: dict[str, dict[str, str]] = {"clip": {"fc2": "its input is post-GELU: no affine producer to fold into"}}


# ----------------------------------------------------------------------------------------------
# rotations
# ----------------------------------------------------------------------------------------------
def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


def _paley(p: int) -> torch.Tensor:
    """Hadamard matrix of order p + 1 (Paley's first construction) for a prime p = 3 mod 4, float64 +-1."""
    residues = {(i * i) % p for i in range(1, p)}
    chi = torch.tensor([0.0] + [1.0 if a in residues else -1.0 for a in range(1, p)], dtype=torch.float64)
    idx = torch.arange(p)
    jacobsthal = chi[(idx.unsqueeze(0) - idx.unsqueeze(1)) % p]  # Q[i, j] = chi(j - i), skew-symmetric
    s = torch.zeros(p + 1, p + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jacobsthal
    return torch.eye(p + 1, dtype=torch.float64) + s


def hadamard_matrix(n: int) -> torch.Tensor:
    """Orthogonal H / sqrt(n), [n, n] float32, for n = 2^k or 2^k (p + 1) with p a prime = 3 mod 4.

    Sylvester's doubling, times Paley's matrix for the odd part (the bundled models' 192 = 16 * 12 and
    768 = 64 * 12). Other widths raise ValueError: use the "orthogonal" rotation for those.
    """
    power = 1
    while n % (2 * power) == 0:
        power *= 2
    for two_k in [power >> i for i in range(power.bit_length())]:  # largest power of two first
        m = n // two_k
        if m in (1, 2) or (m % 4 == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3):
            base = torch.ones(1, 1, dtype=torch.float64) if m == 1 else (
                torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) if m == 2 else _paley(m - 1))
            h = base
            while h.shape[0] < n:
                h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
            return (h / math.sqrt(n)).float()
    raise ValueError(f"no Hadamard rotation for width {n} (it takes 2^k or 2^k * (p + 1), p a prime = 3 mod 4); "
                     "use vision_rotation='orthogonal'")


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal [n, n] float32 matrix, the same for the same (n, seed) (QR of a Gaussian)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + n)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r)).unsqueeze(0)).float()


def rotation_matrix(kind: str, n: int, seed: int) -> torch.Tensor:
    """The [n, n] rotation ``kind`` ("hadamard" or "orthogonal", :data:`ROTATIONS`) for width ``n``.

    "hadamard" at a width no construction here covers (SigLIP's 1152 = 2^7 * 9, 4304) is the seeded random
    orthogonal matrix instead: the default preset rotates, and it must run on every LLaVA tower. On the held-out
    mosaic questions the two rotations did not differ (benchmarks/results/vision_ranges/README.md).
    """
    if kind == "hadamard":
        try:
            return hadamard_matrix(n)
        except ValueError:
            return random_orthogonal(n, seed)
    if kind == "orthogonal":
        return random_orthogonal(n, seed)
    raise ValueError(f"unknown rotation {kind!r}; expected one of {ROTATIONS[1:]}")


@torch.no_grad()
def rotate_inputs(linears: list[QuantLinear], kind: str, seed: int) -> None:
    """Fold one rotation per input width into each (still FP) Linear, W -> W Q, and rotate its input online.

    y = (W Q)(Q^T x): the quantizer (which holds Q, :meth:`ActQuantizer.set_rotation`) sees Q^T x,
    the weight is quantized later as W Q. The weight tensor is replaced, not written into (the FP
    model shares its storage, :mod:`qvlm.quant.working_copy`).
    """
    cache: dict[tuple[int, torch.device], torch.Tensor] = {}  # one matrix per width and device, held by every layer
    for lin in linears:
        if lin.weight_quantized:
            raise RuntimeError("rotate the inputs before the weights are quantized")
        key = (lin.in_features, lin.weight.device)
        if key not in cache:
            cache[key] = rotation_matrix(kind, lin.in_features, seed).to(lin.weight.device)
        q = cache[key]
        lin.weight.data = (lin.weight.data.float() @ q).to(lin.weight.dtype)
        lin.act.set_rotation(q)


# ----------------------------------------------------------------------------------------------
# the fold (RepQ-ViT)
# ----------------------------------------------------------------------------------------------
def tensor_grid(act: ActQuantizer) -> ActQuantizer:
    """A per-tensor quantizer whose one range covers ``act``'s per-channel codes after the fold.

    Step s = the largest s_c (so r_c <= 1), zero point z = the median z_c; its range is stored as
    (lo, hi) = (-z s, (2^b - 1 - z) s), and the fold then uses the (s, z) that range gives back.
    """
    scale, zero = act.grid()
    s, z = float(scale.max()), float(zero.median())
    out = ActQuantizer(act.bits, "tensor")
    out.set_range(torch.tensor([-z * s]), torch.tensor([(qmax_of(act.bits) - z) * s]))
    return out


def fold_shift(act: ActQuantizer, target: ActQuantizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(r [C], s k [C]) in float64: r_c = s_c / s and the integer shift k_c = z - z_c in steps of s."""
    scale, zero = act.grid()
    s, z = target.grid()
    r = scale.double() / s.double()
    return r, s.double() * (z.double() - zero.double())


def grids_equal(acts: list[ActQuantizer]) -> bool:
    first = acts[0].grid()
    return all(torch.equal(a.grid()[0], first[0]) and torch.equal(a.grid()[1], first[1]) for a in acts[1:])


def site_refusal(acts: list[ActQuantizer | None]) -> str | None:
    """Why these quantizers (all reading one tensor) cannot fold into one per-tensor range, or None."""
    if any(a is None or a.granularity != "channel" or not a.calibrated or a.log_hi is not None for a in acts):
        return "not a frozen per-channel range"
    if not grids_equal(acts):
        return "its consumers have different ranges (VEO trains each quantizer on its own): one producer holds one"
    return None


@dataclass
class LinearFold:
    """What the fold does to one Linear: input columns scaled by ``r_in`` with shift ``sk_in`` (its input
    quantizer becomes ``act``), output rows divided by ``r_out`` after subtracting ``delta_out``."""

    r_in: torch.Tensor | None = None
    sk_in: torch.Tensor | None = None
    act: ActQuantizer | None = None
    r_out: torch.Tensor | None = None
    delta_out: torch.Tensor | None = None


@torch.no_grad()
def apply_linear_fold(lin: QuantLinear, fp_weight: torch.Tensor, fp_bias: torch.Tensor | None, fold: LinearFold) -> None:
    """Quantize Q(diag(1 / r_out) W diag(r_in)) again, in ``lin``'s format, and set its bias (module docstring)."""
    w = fp_weight.double()
    b = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device) if fp_bias is None else fp_bias.double()
    if fold.r_out is not None:
        w = w / fold.r_out.unsqueeze(1)
        b = (b - fold.delta_out) / fold.r_out
    if fold.r_in is not None:
        w = w * fold.r_in.unsqueeze(0)
    lin.requantize_weight_(w.to(fp_weight.dtype))
    if fold.sk_in is not None:
        b = b + lin.weight.data.double() @ fold.sk_in
        lin.act = fold.act
    if lin.bias is None:
        lin.bias = nn.Parameter(b.to(lin.weight.dtype), requires_grad=False)
    else:
        lin.bias.data = b.to(lin.bias.dtype)  # a new tensor: the FP model shares the old one


@torch.no_grad()
def fold_layernorm(ln: nn.LayerNorm, r: torch.Tensor, delta: torch.Tensor) -> None:
    """gamma' = gamma / r, beta' = (beta - delta) / r: the LayerNorm outputs (x - delta) / r."""
    ln.weight.data = (ln.weight.double() / r).to(ln.weight.dtype)
    ln.bias.data = ((ln.bias.double() - delta) / r).to(ln.bias.dtype)


@torch.no_grad()
def fold_vision_ranges(qmap: "LayerMap", fp_map: "LayerMap") -> dict:
    """Fold every foldable per-channel vision range into its producer (module docstring); in place.

    ``fp_map``: the FP model's layer map (the weights the folded Linears are quantized again from).
    Returns {"folded": [site], "unfolded": {site: reason}}, a site named "vision.<layer>.<roles>".
    """
    folded, unfolded = [], {}
    style = qmap.vision_style
    for i, (entry, fp_entry) in enumerate(zip(qmap.vision, fp_map.vision)):
        folds: dict[str, LinearFold] = {}
        for ln, roles in entry.norms:  # each LayerNorm and the Linears reading it (the layer map's NORM_SITES)
            site = f"vision.{i}.{'/'.join(roles)}"
            acts = [getattr(entry.linears.get(r), "act", None) for r in roles]
            reason = site_refusal(acts) or (None if ln.weight is not None and ln.bias is not None
                                            else "the LayerNorm has no affine parameters")
            if reason:
                unfolded[site] = reason
                continue
            target = tensor_grid(acts[0])
            r, sk = fold_shift(acts[0], target)
            fold_layernorm(ln, r.to(ln.weight.device), (sk * r).to(ln.weight.device))
            for role in roles:
                fold = folds.setdefault(role, LinearFold())
                fold.r_in, fold.sk_in = r, sk
                fold.act = target if role == roles[0] else tensor_grid(acts[0])
            folded.append(site)
        for producer, consumer in ATTENTION_SITES.get(style, ()):
            site = f"vision.{i}.{consumer}"
            act = getattr(entry.linears.get(consumer), "act", None)
            reason = site_refusal([act])
            if reason:
                unfolded[site] = reason
                continue
            target = tensor_grid(act)
            r, sk = fold_shift(act, target)
            folds.setdefault(producer, LinearFold()).r_out = r
            folds[producer].delta_out = sk * r
            fold = folds.setdefault(consumer, LinearFold())
            fold.r_in, fold.sk_in, fold.act = r, sk, target
            folded.append(site)
        for role, reason in UNFOLDABLE.get(style, {}).items():
            unfolded[f"vision.{i}.{role}"] = reason
        for role, fold in folds.items():
            fp = fp_entry.linears[role]
            apply_linear_fold(entry.linears[role], fp.weight.data.to(entry.linears[role].weight.device),
                              fp.bias, fold)
    return {"folded": folded, "unfolded": unfolded}


@dataclass(frozen=True)
class FoldVisionRanges:
    """The last step of a run with ``QuantConfig.vision_fold_ranges``: fold the final vision ranges.

    Records the folded and unfolded sites in the run's notes ("vision.fold").
    """

    name: ClassVar[str] = "fold"

    def run(self, qrun: "QuantRun") -> None:
        if not qrun.config.quantize_vision:
            return
        with qrun.timed(self.name):
            qrun.notes.vision_fold = fold_vision_ranges(qrun.qmap, qrun.fp.layer_map)
