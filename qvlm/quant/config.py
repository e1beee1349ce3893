"""QuantConfig: every parameter of a quantization run, with the reason for each default.

The paper leaves many choices open (arXiv 2410.08119 §3.2-§3.3 and §4.1-§4.3); each one is a
field here so a run is reproducible from its saved JSON alone. The config is the run's saved form and
plain data: it imports no stage. The run-wide choices (bits, formats, what is quantized, calibration,
the entropy estimator) are its own; each stage's settings (:class:`~qvlm.quant.veo.VisualEncoderOptimization`'s
``lr``, ...) are fields of the stage, whose defaults are the fields here they are saved as (the stage's
``SAVED_AS``: ``veo_lr``, ...), so each default and its reason are written once, here.
:func:`qvlm.quant.recipes.configured_stages` builds the configured stages a recipe runs from a config,
:meth:`QuantConfig.with_stages` records given ones.

A config starts from a preset (:mod:`qvlm.quant.presets`: the measured best, the paper's text, the
authors' code): ``QuantConfig()`` is the ``recommended`` one, ``from_bits(..., preset=...)`` applies
another, and ``preset_differences()`` says where a config departs from its preset.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence

from qvlm.quant.presets import DEFAULT_PRESET, get_preset
from qvlm.quant.quantizers import check_group_size

RECIPE_NAMES: tuple[str, ...] = ("fp", "rtn", "qlora", "awq", "qvlm-cdm", "qvlm-veo", "qvlm")
"""The recipes a config may name, in the order of the table in :mod:`qvlm.quant.recipes` (which
must hold exactly these: ``RECIPES`` equals this tuple)."""
BIT_SETTINGS: tuple[str, ...] = ("W8A8", "W6A6", "W4A4", "W4A3", "W3A3")
"""The bit settings the app and the bench offer (any WxAy with x, y in 2..8 is valid in a config)."""

_BITS_RE = re.compile(r"^\s*w(\d+)\s*a(\d+)\s*$", re.IGNORECASE)
H0_RULE = re.compile(r"^(mean|median|quantile:(?P<q>[0-9.eE+-]+)|value:(?P<v>[0-9.eE+-]+))$")
"""The forms ``h0_rule`` may take."""


@dataclass
class QuantConfig:
    """One quantization run. ``validate()`` turns bad values into a user-facing ValueError."""

    # --- what and how many bits ---------------------------------------------------------------
    recipe: str = "qvlm"
    """One of ``RECIPE_NAMES``: fp, rtn, qlora, awq, qvlm-cdm, qvlm-veo, qvlm."""
    preset: str = DEFAULT_PRESET
    """The preset this config started from (:data:`qvlm.quant.presets.PRESETS`: "recommended", "paper",
    "authors-code"). The defaults below are the "recommended" preset's values; ``from_bits`` applies
    another preset's. Recorded so a saved run says what it started from (``preset_differences``)."""
    w_bits: int = 4
    """Weight bit-width, 2..8 (paper: W6A6 and W4A4; W8A8 in Tables 4/6)."""
    a_bits: int = 4
    """Activation bit-width, 2..8."""
    vision_w_bits: int | None = None
    """Weight bit-width of the vision-tower Linears, 2..8; None = ``w_bits``. Why: the vision tower's
    activations make every image token the LLM sees (paper §3.3), so it can deserve more bits than
    the LLM."""
    vision_a_bits: int | None = None
    """Activation bit-width of the vision-tower Linears, 2..8; None = ``a_bits``."""
    weight_format: str = "auto"
    """"uniform" (asymmetric round-to-nearest), "nf4" (NormalFloat levels as in QLoRA; at bits other
    than 4 the same construction with 2^b levels), or "auto": the recipe's own choice (nf4 for
    ``qlora`` and the Q-VLM recipes built on it, uniform for ``rtn`` and ``awq``; see
    :mod:`qvlm.quant.recipes` for why)."""
    weight_group_size: int | None = None
    """Input elements sharing one weight range. None = the recipe's default: NormalFloat uses QLoRA's
    block of 64, ``awq`` groups of 64, ``rtn`` (and uniform weights otherwise) one range per output channel."""
    act_granularity_language: str = "channel"
    """LLM activation ranges: "channel" (static per input channel, RPTQ-style, paper §4.3), "tensor", or
    "dynamic_token": each token row's own min/max at run time, nothing calibrated, exactly the grid of
    the integer path's dynamic mode (:func:`qvlm.quant.quantizers.fake_quant_dynamic`). Why: one row's
    range fits that token, so no level is spent on another token's outliers; the price is a min/max
    per row at run time. CDM then has no language ranges to search and is skipped."""
    act_granularity_vision: str = "channel"
    """Vision activation ranges: "channel" (static per input channel; the "recommended" preset:
    benchmarks/results/veo_granularity.md), "token" (static per token position, OS-style, the
    paper's choice in §4.3: the "paper" preset) or "tensor". Per-channel static ranges cannot run
    on the integer kernels (:mod:`qvlm.quant.integer`), so those vision Linears stay simulated.
    "dynamic_token": each token row's own min/max at run time (as ``act_granularity_language``); the
    layer-wise lp clipping does not shrink it (the integer path's dynamic grid has no ratio), and VEO,
    which has no bounds to train then, is skipped."""
    act_dynamic_clip: str = "none"
    """With "dynamic_token" ranges in a tower: "lp" shrinks each quantizer's per-token ranges by one factor,
    each row quantized on [c * min, c * max] with the values beyond clamped (QuaRot clips per-token ranges the
    same way, with a fixed 0.9); the layer-wise init chooses c from ``init_clip_grid`` by the lp distance on the
    calibration pairs (as it clips static ranges), and VEO trains the vision tower's c (as log c), so the method
    has something to train on ranges the integer kernels take, which apply the same factor. "none": each row's
    own min/max (nothing calibrated). CDM searches no factor (it stays skipped on dynamic language ranges).
    Default "none" because it helps only at low activation bits: mosaic held-out, ``integer`` preset, qvlm, W4A3
    79.4% with "lp" vs 76.2% without (McNemar p = 0.0095), W4A4 81.8% vs 83.9% (p = 0.011)
    (benchmarks/results/integer_recipe/README.md, section 5)."""
    vision_fold_ranges: bool = False
    """With "channel" vision ranges: after the last stage, rewrite each per-channel range whose input is a
    LayerNorm output (q/k/v, fc1) as one per-tensor range, folding the per-channel steps and integer
    shifts into the LayerNorm and the consuming Linears (RepQ-ViT, arXiv 2212.08254). Why: the same codes
    in exact arithmetic, with a grid the integer kernels can run. The folded weights are quantized
    again from the FP weights (:mod:`qvlm.quant.vision_ranges` says why that order)."""
    vision_rotation: str = "hadamard"
    """"none", "hadamard" or "orthogonal": rotate the input of every vision Linear by one orthogonal Q
    per width, y = (W Q)(Q^T x), the activation quantizer seeing Q^T x (QuaRot, arXiv 2404.00456). Why:
    a rotation spreads a few large channels over all of them, so a per-token range wastes fewer levels.
    "hadamard" is a Hadamard matrix where the width is 2^k or 2^k (p + 1), p a prime = 3 mod 4 (192 = 16 * 12,
    1024, 4096), else the seeded random orthogonal one; "orthogonal" is a random orthogonal Q seeded by ``seed``.
    Default "hadamard" (the recommended preset): chosen on held-out train questions, see README "Why the
    defaults differ from the paper"."""
    quantize_vision: bool = True
    """Quantize the vision-tower Linears (the paper's memory argument in Table 4 needs it)."""
    quantize_language: bool = True
    """Quantize the LLM decoder Linears."""
    quantize_projector: bool = False
    """Quantize the multimodal projector (kept FP16 by the authors' code; the paper is silent)."""
    quantize_lm_head: bool = False
    """Quantize lm_head (kept FP by HF/bitsandbytes and the authors' code)."""
    quantize_embeddings: bool = False
    """Weight-only RTN of the token-embedding table (kept FP by default)."""

    # --- calibration --------------------------------------------------------------------------
    calib_size: int = 64
    """Image-question-answer pairs from the easy-VQA *train* split (paper: 64)."""
    calib_seed: int = 0
    calib_batch: int = 8
    """Samples per forward pass during calibration and VEO (paper: batch 8)."""

    # --- layer-wise init (the QLoRA-style initialization, paper §4.1) -------------------------
    init_clip_grid: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)
    """Shrink factors of the min/max range tried by the lp clipping search (the authors' grid)."""
    init_lp_norm: float = 2.0
    """p of the lp distance mean|Q(x)-x|^p minimised by the clipping search. The paper cites
    LAPQ/AWQ without a value; 2 (MSE) is the common choice (the authors' code uses 0.5)."""

    # --- CDM: entropy, partition, block search (Eqs. 3-7) -------------------------------------
    percentiles: tuple[float, ...] = (1.0, 0.995, 0.99, 0.985, 0.98)
    """Percentile grid searched per decoder layer (paper: 1.0 to 0.98, step 0.005). Each layer's
    candidates are these plus its incumbent ranges (what the layer-wise init or VEO left), so the
    search can never end a block worse than it started it."""
    percentile_source: str = "quantized"
    """Distribution the percentiles are read from: "quantized" (each quantizer's own input on the
    quantized path, what it will see at inference) or "fp" (the full-precision model's input)."""
    max_block_depth: int = 3
    """Maximum decoder layers per block (paper: 3)."""
    h0_rule: str = "mean"
    """Eq. 7 threshold: "mean" of D(k,k+1) (as the authors' Dec-2024 code), "median",
    "quantile:<q>" or "value:<x>"."""
    soft_temperature: float = 1.0
    """tau of the Eq. 5 soft assignment exp(-((x-q_m)/Delta)^2 / tau) (scale-invariant form)."""
    soft_delta_mode: str = "scaled"
    """"scaled": exp(-((x-q)/Delta)^2/tau) (recommended); "literal": exp(-(x-q)^2/Delta) as printed."""
    entropy_site: str = "attn_input"
    """Activations Eq. 4 pairs across layers: "attn_input" (post-input-norm input of q/k/v, quantized
    with that layer's q_proj grid) or "residual" (the residual stream entering the layer, min/max grid)."""
    joint_search: str = "coordinate"
    """Eq. 3 search within a block: "coordinate" (coordinate descent from the better of the greedy
    choice and the incumbent: never worse than either) or "exhaustive" (all |G|^|B| combinations,
    prefix-shared, as the paper describes). Default by measurement (bundled model, 64 pairs, 2-core
    CPU): at W4A3 both pick the same ranges, coordinate in 77 layer passes / 0.94x the layer-wise
    search time, exhaustive in 288 / 3.2x; see README "How the CDM defaults were chosen"."""

    block_objective: str = "normed_hidden"
    """What a CDM block's error (Eq. 3) compares with FP: "normed_hidden" (the block output as the
    next layer sees it, after that layer's input RMSNorm; after the final norm for the last layer),
    "linear_output" (the output of the block's last Linear, down_proj: the paper's Eq. 3 reading)
    or "residual" (the raw residual stream the block outputs). See README "Choosing the block
    objective" for the paired tests behind the default."""

    cdm_accept: str = "holdout"
    """When a block's searched choice is kept: "holdout" (it must lower the error at the LLM's output,
    with the later layers at their incumbent ranges, both on the calibration pairs and on
    ``cdm_holdout_images`` train pairs the calibration never saw; else the block keeps its incumbent),
    "final_output" (the same check on the calibration pairs only) or "block" (it lowers the block
    objective, Eq. 3, as the paper does). Why not the block objective: at W3A3 it lowers every
    block's error yet raises the final error and loses 0.44 pt to qlora (p < 0.01). Why held-out
    pairs: with the calibration check alone, qvlm-cdm on the mosaic model at W4A3 lost 1.7 pt to
    qlora on the test split (p = 2.3e-5); on held-out train questions the calibration check lost
    1.2-1.6 pt and the held-out check with ``cdm_accept_metric="answer_kl"`` none (README "How the
    CDM defaults were chosen")."""
    cdm_accept_metric: str = "answer_kl"
    """The output error the acceptance checks compare: "answer_kl" (KL(FP || quantized) of the
    next-token distribution at the answer positions, teacher-forced: what moves the answers) or
    "output_mse" (MSE of the LLM's final hidden state over every real token and channel). Chosen on
    held-out train questions (mosaic model, W4A3): the MSE fell on unseen pairs for choices that
    lost answers (71.7% against qlora's 72.9%); the answer KL rejected them (72.9%)."""
    cdm_holdout_images: int | None = None
    """Train pairs outside the calibration set (drawn like VEO's held-out pairs, so the same images
    when the counts match) on which ``cdm_accept="holdout"`` checks a block's choice. None: as many as
    the calibration pairs (the check sees as much unseen data as the search saw, and a quick run
    stays quick); 0 falls back to the calibration check alone."""

    # --- VEO (Eqs. 8-10) ----------------------------------------------------------------------
    veo_epochs: int = 10
    """Passes over the calibration set (paper: 10 epochs of 64 pairs, batch 8 = 80 steps)."""
    veo_lr: float = 0.02
    """Adam learning rate on the log-magnitude of each vision activation bound. Chosen on held-out
    images (256 train images VEO never saw, bundled model, W4A4/W4A3/W3A3; benchmarks/results/veo_lr.md):
    0.02 gave the lowest LLM-output error at all three settings and the lowest mean answer-token KL
    (0.097 nats, against 0.157 for 1e-3, the former default, and 0.161 for 0.01)."""
    veo_lambda1: float = 0.01
    """Weight of the Jacobian-weighted entropy L_ent (authors' code uses 0.01 for its entropy term)."""
    veo_lambda2: float = 1.0
    """Weight of the error term L_err."""
    veo_eta: float = 1.0
    """Balance between visual-output and LLM-output error inside L_err (Eq. 9)."""
    veo_params: str = "act_bounds"
    """What VEO trains: "act_bounds" (vision activation-quantizer bounds; recommended) or
    "act_bounds+layernorm" (also the vision LayerNorm affine parameters)."""
    veo_visual_output: str = "projector"
    """X^v of Eq. 9: "projector" (the image tokens the LLM sees) or "vision" (selected vision features)."""
    veo_jacobian_every: int = 1
    """Recompute the Eq. 8 Jacobian weights every this many steps (1 = every batch, as designed)."""
    veo_micro_batch: int | None = None
    """Pairs per forward/backward pass in VEO; gradients accumulate over the calibration batch, so
    each optimizer step still sees ``calib_batch`` pairs. Why: VEO backpropagates through the whole
    LLM, whose saved activations grow with the batch (LLaVA-1.5-7B at batch 8 needs far more than
    a 24 GB GPU holds). None = the whole batch in one pass (the reference behaviour); with fewer,
    each loss term is a row-weighted mean of the micro-batch means (the same up to how answer
    tokens are spread over the rows)."""
    veo_checkpoint: bool = False
    """Recompute each decoder layer's activations in VEO's backward instead of keeping them
    (activation checkpointing): the backward through the LLM then holds one layer's activations,
    not all of them, for about one extra forward pass. Same losses and gradients; for large models
    (with ``veo_micro_batch``, what lets LLaVA-1.5-7B's VEO fit a 24 GB GPU)."""

    veo_holdout_images: int = 64
    """Train images outside the calibration set on which Eq. 9's error (visual + eta * LLM output,
    against FP) is measured before VEO and after every epoch (0: no held-out check). Why: VEO fits
    its bounds to the calibration images; only unseen images tell whether it generalises."""
    veo_early_stopping: bool = True
    """Keep the bounds of the epoch (0 = the layer-wise init) with the lowest held-out error, so VEO
    never leaves the vision tower worse on unseen images than it found it (needs veo_holdout_images)."""
    veo_calib_size: int | None = None
    """Train pairs VEO learns from (None: the run's calibration pairs). The easy-VQA train split
    has 4,000 images; more of them fit the same bounds with less overfitting."""

    # --- AWQ baseline -------------------------------------------------------------------------
    awq_grid: int = 20
    """Number of alpha values in [0, 1) for AWQ's scale search s = mean|x|^alpha (AWQ: 20)."""
    awq_max_tokens: int = 4096
    """Calibration tokens (random subset) used to score each AWQ candidate."""

    # --- storage ------------------------------------------------------------------------------
    pack_weights: bool = True
    """Store every quantized weight as packed b-bit codes with its steps and zero points
    (:class:`qvlm.quant.packing.PackedLinear`, dequantized in each forward): the weight memory is
    then real, and the answers are bit-identical to the fake-quant model. Decoder layers are
    packed as soon as their init is done (their weights are final then), so the copy never holds
    the LLM decoded; the vision tower, projector and lm_head at the end of the run."""

    # --- bookkeeping --------------------------------------------------------------------------
    seed: int = 0
    """Seed for any subsampling."""
    keep_per_sample_stats: bool = False
    """Keep per-sample entropies in the result (for DED analysis)."""

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_bits(cls, bits: str, recipe: str = "qvlm", preset: str = DEFAULT_PRESET,
                  **overrides: Any) -> "QuantConfig":
        """``QuantConfig.from_bits("W4A4", recipe="qvlm", preset="paper", calib_size=32)``.

        The preset's values are applied first, then ``overrides`` (an override wins); ``bits``
        accepts any case and "w6a6"-style.
        """
        w_bits, a_bits = parse_bits(bits)
        values = {**get_preset(preset).values, **overrides}
        return cls(recipe=recipe, preset=preset, w_bits=w_bits, a_bits=a_bits, **values).validate()

    def tower_bits(self, tower: str) -> tuple[int, int]:
        """(weight bits, activation bits) of the Linears of ``tower`` ("vision", "language", ...)."""
        if tower == "vision":
            return (self.w_bits if self.vision_w_bits is None else self.vision_w_bits,
                    self.a_bits if self.vision_a_bits is None else self.vision_a_bits)
        return self.w_bits, self.a_bits

    @property
    def bits_label(self) -> str:
        """"W4A4", "FP", or "W4A4 (vision W4A8)" when a quantized vision tower has bits of its own."""
        if self.recipe == "fp":
            return "FP"
        label = f"W{self.w_bits}A{self.a_bits}"
        vision = self.tower_bits("vision")
        if self.quantize_vision and vision != (self.w_bits, self.a_bits):
            label += f" (vision W{vision[0]}A{vision[1]})"
        return label

    def preset_differences(self) -> dict[str, tuple[Any, Any]]:
        """{field: (the preset's value, this config's value)} for every field where this config departs
        from its preset (JSON values, as in ``to_dict``).

        The preset's config is its values on top of the defaults, with this config's recipe and bits
        (those are the run's choice, not the preset's).
        """
        mine = self.to_dict()
        theirs = QuantConfig(recipe=self.recipe, preset=self.preset, w_bits=self.w_bits, a_bits=self.a_bits,
                             **get_preset(self.preset).values).to_dict()
        return {k: (theirs[k], v) for k, v in mine.items() if theirs[k] != v}

    def with_stages(self, stages: Sequence[object]) -> "QuantConfig":
        """This config with the settings of ``stages`` written into its saved fields (validated).

        Why: a run given its own configured stages saves what they ran with; the flat JSON holds one
        stage of each kind, so two stages of one kind with different settings are refused.
        """
        return self.replace(**saved_settings(stages))

    def validate(self) -> "QuantConfig":
        """Raise ValueError naming the field and the allowed values; return self when fine."""
        if self.recipe not in RECIPE_NAMES:
            raise ValueError(f"unknown recipe {self.recipe!r}; choose one of: {', '.join(RECIPE_NAMES)}")
        get_preset(self.preset)
        for name in ("w_bits", "a_bits", "vision_w_bits", "vision_a_bits"):
            v = getattr(self, name)
            if v is None and name.startswith("vision_"):
                continue
            if isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= 8:
                raise ValueError(f"{name} must be a whole number of bits from 2 to 8, got {v!r}")
        _choice("weight_format", self.weight_format, ("auto", "uniform", "nf4"))
        if self.weight_group_size is not None and (
            isinstance(self.weight_group_size, bool) or not isinstance(self.weight_group_size, int)
        ):
            raise ValueError(f"weight_group_size must be None or a whole number, got {self.weight_group_size!r}")
        try:
            check_group_size(self.weight_group_size)
        except ValueError as err:
            raise ValueError(f"weight_group_size: {err}") from None
        _choice("act_granularity_language", self.act_granularity_language, ("channel", "tensor", "dynamic_token"))
        _choice("act_granularity_vision", self.act_granularity_vision, ("token", "channel", "tensor", "dynamic_token"))
        _choice("vision_rotation", self.vision_rotation, ("none", "hadamard", "orthogonal"))
        _choice("act_dynamic_clip", self.act_dynamic_clip, ("none", "lp"))
        if not isinstance(self.vision_fold_ranges, bool):
            raise ValueError(f"vision_fold_ranges must be true or false, got {self.vision_fold_ranges!r}")
        if self.vision_fold_ranges and self.act_granularity_vision != "channel":
            raise ValueError("vision_fold_ranges folds per-channel ranges: it needs act_granularity_vision='channel'")
        if self.vision_fold_ranges and self.vision_rotation != "none":
            raise ValueError("vision_fold_ranges and vision_rotation cannot be combined: a rotated input has no "
                             "LayerNorm channel to fold a range into")
        if self.recipe == "awq" and self.vision_fold_ranges:
            raise ValueError("the awq recipe's per-channel input scales cannot be combined with vision_fold_ranges; "
                             "choose another recipe")
        for name in ("quantize_vision", "quantize_language", "quantize_projector", "quantize_lm_head",
                     "quantize_embeddings", "keep_per_sample_stats", "pack_weights", "veo_checkpoint",
                     "veo_early_stopping"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        _positive_int("calib_size", self.calib_size)
        _positive_int("calib_batch", self.calib_batch)
        _int("calib_seed", self.calib_seed)
        _int("seed", self.seed)
        _grid("init_clip_grid", self.init_clip_grid, low=0.0, low_open=True)
        _number("init_lp_norm", self.init_lp_norm, low=0.0, low_open=True)
        _grid("percentiles", self.percentiles, low=0.5, low_open=True)
        _choice("percentile_source", self.percentile_source, ("quantized", "fp"))
        _positive_int("max_block_depth", self.max_block_depth)
        if not H0_RULE.match(str(self.h0_rule).strip()):
            raise ValueError(
                f"h0_rule must be 'mean', 'median', 'quantile:<q>' or 'value:<x>', got {self.h0_rule!r}"
            )
        m = H0_RULE.match(str(self.h0_rule).strip())
        if m and m.group("q") is not None and not 0.0 <= float(m.group("q")) <= 1.0:
            raise ValueError(f"h0_rule quantile must be between 0 and 1, got {m.group('q')}")
        _number("soft_temperature", self.soft_temperature, low=0.0, low_open=True)
        _choice("soft_delta_mode", self.soft_delta_mode, ("scaled", "literal"))
        _choice("entropy_site", self.entropy_site, ("attn_input", "residual"))
        _choice("joint_search", self.joint_search, ("exhaustive", "coordinate"))
        _choice("block_objective", self.block_objective, ("normed_hidden", "linear_output", "residual"))
        _choice("cdm_accept", self.cdm_accept, ("block", "final_output", "holdout"))
        _choice("cdm_accept_metric", self.cdm_accept_metric, ("answer_kl", "output_mse"))
        if self.cdm_holdout_images is not None:
            _int("cdm_holdout_images", self.cdm_holdout_images, low=0)
        _int("veo_epochs", self.veo_epochs, low=0)
        _number("veo_lr", self.veo_lr, low=0.0, low_open=True)
        _number("veo_lambda1", self.veo_lambda1, low=0.0)
        _number("veo_lambda2", self.veo_lambda2, low=0.0)
        _number("veo_eta", self.veo_eta, low=0.0)
        _choice("veo_params", self.veo_params, ("act_bounds", "act_bounds+layernorm"))
        _choice("veo_visual_output", self.veo_visual_output, ("projector", "vision"))
        _positive_int("veo_jacobian_every", self.veo_jacobian_every)
        _int("veo_holdout_images", self.veo_holdout_images, low=0)
        if self.veo_calib_size is not None:
            _positive_int("veo_calib_size", self.veo_calib_size)
        if self.veo_micro_batch is not None:
            _positive_int("veo_micro_batch", self.veo_micro_batch)
        _positive_int("awq_grid", self.awq_grid)
        _positive_int("awq_max_tokens", self.awq_max_tokens)
        return self

    # --- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        if not isinstance(d, dict):
            raise ValueError("a quantization config must be a JSON object")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown QuantConfig field(s): {', '.join(unknown)}")
        kwargs = {}
        for k, v in d.items():
            if isinstance(v, list):
                v = tuple(v)
            kwargs[k] = v
        return cls(**kwargs).validate()

    @classmethod
    def from_json(cls, s: str) -> "QuantConfig":
        try:
            d = json.loads(s)
        except json.JSONDecodeError as err:
            raise ValueError(f"quantization config is not valid JSON: {err}") from err
        return cls.from_dict(d)

    def replace(self, **changes: Any) -> "QuantConfig":
        d = self.to_dict()
        d.update(changes)
        return QuantConfig.from_dict(d)


def saved_settings(stages: Sequence[object]) -> dict[str, Any]:
    """{saved config field: value} of these stages' settings (``SAVED_AS``; a stage without it has none to save);
    ValueError when two stages give one field two values, which one flat config cannot hold."""
    values: dict[str, Any] = {}
    for stage in stages:
        for f, name in getattr(type(stage), "SAVED_AS", {}).items():
            value = getattr(stage, f)
            if name in values and values[name] != value:
                raise ValueError(f"two {type(stage).__name__} stages set {f} to {values[name]!r} and {value!r}; "
                                 f"a saved config holds one value per setting")
            values[name] = value
    return {name: list(v) if isinstance(v, tuple) else v for name, v in values.items()}


def parse_bits(bits: str) -> tuple[int, int]:
    """"W4A8" (any case, spaces allowed) -> (4, 8); ValueError for anything else."""
    m = _BITS_RE.match(str(bits))
    if not m:
        raise ValueError(f"bit setting {bits!r} not understood; write it like W4A4, W6A6 or W8A8")
    return int(m.group(1)), int(m.group(2))


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")


def _int(name: str, value: Any, low: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")


def _positive_int(name: str, value: Any) -> None:
    _int(name, value, low=1)


def _number(name: str, value: Any, low: float | None = None, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'greater than' if low_open else 'at least'} {low}, got {value}")


def _grid(name: str, values: Any, low: float, low_open: bool) -> None:
    if not isinstance(values, (tuple, list)) or not values:
        raise ValueError(f"{name} must be a non-empty list of numbers")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v > 1.0 or (
            v < low or (low_open and v == low)
        ):
            raise ValueError(f"every value of {name} must be in ({low}, 1.0], got {v!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} has repeated values: {list(values)}")

