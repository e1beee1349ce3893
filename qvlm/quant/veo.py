"""Visual encoder optimization (paper §3.3, Eqs. 8-10).

Trainable: the vision tower's activation-quantizer bounds (log-magnitudes, STE through round),
optionally the vision LayerNorm affine parameters. Frozen: every weight, the projector, and the
whole LLM including its (already initialised) activation quantizers.

    L     = L_reg + lambda1 * L_ent + lambda2 * L_err                          (Eq. 10, veo_objective)
    L_reg = next-token cross-entropy on the answer tokens (teacher forcing)    (answer_loss)
    L_ent = sum_k w_k * D_soft(k, k+1)                                         (Eq. 8, weighted_entropy; sign
            corrected: the paper's  sum p log p  is -D; adding it would *maximise* entropy, against the text)
    w_k   = || dE / dX^(k) ||, E = ||X_q^(n) - X_r^(n)||^2, normalised to sum 1, detached  (jacobian_weights)
    L_err = MSE(X_q^v, X_r^v) + eta * MSE(X_q^(n), X_r^(n))                    (Eq. 9, output_error; norms as MSE)

X^v is the projector output (the image tokens the LLM sees) or the selected vision features;
X^(n) is the LLM's last hidden state (after the final norm, before lm_head). :class:`VEOCapture`
holds what one forward pass showed (X^(k), the entropy sites, the projector's input and output);
:func:`optimize_vision_bounds` is the loop around them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, ClassVar, Sequence

import torch
import torch.nn.functional as F

from qvlm.models import LayerMap, core_model
from qvlm.utils.progress import STAGE_VEO, StepProgress, check_cancel, report
from qvlm.quant.calibration import CalibBatch, calibration_batches, masked_mse
from qvlm.quant.config import QuantConfig
from qvlm.quant.entropy import pair_entropy
from qvlm.quant.records import HeldOutError, VeoEpoch, VeoStep

if TYPE_CHECKING:
    from qvlm.quant.quantizers import ActQuantizer
    from qvlm.quant.run import QuantRun

Grid = tuple[torch.Tensor, torch.Tensor]
Target = dict[str, torch.Tensor]
"""The FP model's X_r^v ("xv") and X_r^(n) ("xn") for one (micro-)batch."""
LOSS_TERMS = ("total", "reg", "ent", "err")


@dataclass(frozen=True)
class VisualEncoderOptimization:
    """Eqs. 8-10: learn the vision tower's activation bounds against the FP model.

    A configured stage: its settings are its fields, saved in the run's config as ``veo_<field>``
    (:data:`SAVED_AS`), where each default's reason is written (``QuantConfig.veo_lr``, ...);
    ``recipes.configured_stages`` builds the stage from a config, ``QuantConfig.with_stages`` saves it.
    The entropy estimator it shares with CDM (``a_bits``, ``soft_*``, ``entropy_site``) stays the run's.
    """

    name: ClassVar[str] = STAGE_VEO
    SAVED_AS: ClassVar[dict[str, str]] = {f: f"veo_{f}" for f in (
        "epochs", "lr", "lambda1", "lambda2", "eta", "params", "visual_output", "jacobian_every", "micro_batch",
        "checkpoint", "holdout_images", "early_stopping", "calib_size")}
    """Field -> its name in the saved (flat) config."""

    epochs: int = QuantConfig.veo_epochs
    lr: float = QuantConfig.veo_lr
    lambda1: float = QuantConfig.veo_lambda1
    lambda2: float = QuantConfig.veo_lambda2
    eta: float = QuantConfig.veo_eta
    params: str = QuantConfig.veo_params
    visual_output: str = QuantConfig.veo_visual_output
    jacobian_every: int = QuantConfig.veo_jacobian_every
    micro_batch: int | None = QuantConfig.veo_micro_batch
    checkpoint: bool = QuantConfig.veo_checkpoint
    holdout_images: int = QuantConfig.veo_holdout_images
    early_stopping: bool = QuantConfig.veo_early_stopping
    calib_size: int | None = QuantConfig.veo_calib_size

    def run(self, qrun: "QuantRun") -> None:
        cfg = qrun.config
        if not cfg.quantize_vision:
            return
        if cfg.act_granularity_vision == "dynamic_token" and cfg.act_dynamic_clip == "none":
            qrun.notes.veo_skipped = ("dynamic_token vision ranges are each token's min/max at run time: "
                                         "VEO has no bounds to train (act_dynamic_clip='lp' gives it a clip factor)")
            qrun.report(STAGE_VEO, 1.0, "skipped: " + qrun.notes.veo_skipped)
            return
        with qrun.timed(STAGE_VEO):
            qrun.report(STAGE_VEO, 0.0, "FP targets")
            batches = qrun.batches
            if self.calib_size is not None and qrun.calibration is None:
                batches = calibration_batches(qrun.fp, self.calib_size, cfg.calib_seed, cfg.calib_batch)
                qrun.seen_size = max(qrun.seen_size, self.calib_size)
            holdout = qrun.holdout_batches(self.holdout_images, qrun.seen_size)
            qrun.veo_losses, qrun.veo_holdout = optimize_vision_bounds(
                qrun.qmodel, qrun.qmap, qrun.fp.model, qrun.fp.layer_map, batches, self, cfg, qrun.entropy_grids(),
                qrun.progress, qrun.cancel, holdout)


# ---------------------------------------------------------------------------------- what a pass shows
class VEOCapture:
    """Hooks that keep what one forward pass showed: X^(k) entering each decoder layer (``layer_in``),
    the entropy-site activations of each layer (``site``) and the projector's input and output.

    A context manager: leaving it removes the hooks. :meth:`clear` drops the kept tensors (and
    with them the autograd graph they hold) between passes.
    """

    def __init__(self, projector: torch.nn.Module, layers: Sequence[torch.nn.Module] = (),
                 sites: Sequence[torch.nn.Module] = ()) -> None:
        self.layer_in: list[torch.Tensor | None] = [None] * len(layers)
        self.site: list[torch.Tensor | None] = [None] * len(sites)
        self.projector_io: dict[str, torch.Tensor] = {}
        self._handles = [m.register_forward_pre_hook(self._keeper(self.layer_in, i), with_kwargs=True)
                         for i, m in enumerate(layers)]
        self._handles += [m.register_forward_pre_hook(self._keeper(self.site, i), with_kwargs=True)
                          for i, m in enumerate(sites)]
        self._handles.append(projector.register_forward_hook(self._keep_projector_io))

    @staticmethod
    def _keeper(slots: list, i: int) -> Callable:
        def hook(module, args, kwargs):
            slots[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def _keep_projector_io(self, module, args, output) -> None:
        self.projector_io["in"], self.projector_io["out"] = args[0], output

    def visual(self, which: str) -> torch.Tensor:
        """X^v of Eq. 9: the projector's output ("projector") or its input, the vision features ("vision")."""
        return self.projector_io["out"] if which == "projector" else self.projector_io["in"]

    def clear(self) -> None:
        self.layer_in[:] = [None] * len(self.layer_in)
        self.site[:] = [None] * len(self.site)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "VEOCapture":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@torch.no_grad()
def fp_targets(fp_model, fp_map: LayerMap, batches: list[CalibBatch], visual_output: str) -> list[Target]:
    """X_r^v and X_r^(n) per batch, from the FP model.

    X^v is taken with a hook on the projector (its output, or its input for "vision"), exactly
    where the quantized path's X_q^v is taken, so both have the same layout in every family
    (LLaVA-NeXT tiles and re-packs image features after the projector).
    """
    core = core_model(fp_model)
    out = []
    with VEOCapture(fp_map.projector) as seen:
        for b in batches:
            hidden = core(**b.model_inputs(), use_cache=False).last_hidden_state
            out.append({"xv": seen.visual(visual_output).detach(), "xn": hidden.detach()})
    return out


# ---------------------------------------------------------------------------------- the equations
def answer_loss(qmodel, hidden: torch.Tensor, chunk: CalibBatch) -> torch.Tensor:
    """L_reg of Eq. 10: next-token cross-entropy on the answer tokens (teacher forcing); hidden [B, T, C]."""
    pos = chunk.answer_mask.nonzero(as_tuple=False)
    logits = qmodel.lm_head(hidden[pos[:, 0], pos[:, 1] - 1])
    return F.cross_entropy(logits.float(), chunk.input_ids[pos[:, 0], pos[:, 1]])


def output_error(xv: torch.Tensor, hidden: torch.Tensor, target: Target, mask: torch.Tensor | None,
                 eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_err, E) of Eq. 9: L_err = MSE(X_q^v, X_r^v) + eta * E, with E = MSE(X_q^(n), X_r^(n)) on real tokens.

    E is returned too: it is the error whose Jacobians give Eq. 8's weights.
    """
    e_n = masked_mse(hidden, target["xn"], mask)
    return masked_mse(xv, target["xv"], None) + eta * e_n, e_n


def jacobian_weights(e_n: torch.Tensor, layer_inputs: list[torch.Tensor | None]) -> torch.Tensor:
    """w_k of Eq. 8, [L]: || dE / dX^(k) || per decoder layer k, normalised to sum 1, detached.

    A layer whose input carries no gradient gets 0; if every norm is 0 the weights are uniform.
    """
    usable = [h is not None and h.requires_grad for h in layer_inputs]
    if not any(usable):  # nothing trainable reaches the LLM (e.g. the selected vision layer precedes every quantizer)
        return torch.full((len(layer_inputs),), 1.0 / max(1, len(layer_inputs)))
    grads = torch.autograd.grad(e_n, [h for h, u in zip(layer_inputs, usable) if u], retain_graph=True,
                                allow_unused=True)
    norms, gi = [], iter(grads)
    for u in usable:
        g = next(gi) if u else None
        norms.append(0.0 if g is None else float(g.float().norm()))
    w = torch.tensor(norms)
    return w / w.sum() if float(w.sum()) > 0 else torch.full_like(w, 1.0 / max(1, len(w)))


def weighted_entropy(sites: list[torch.Tensor], grids: list[Grid], weights: torch.Tensor,
                     mask: torch.Tensor | None, cfg: "QuantConfig", device: torch.device) -> torch.Tensor:
    """L_ent of Eq. 8: sum_k w_k * D_soft(k, k+1), D averaged over the samples (Eqs. 4-5).

    ``sites[k]``: [B, T, C] activations at layer k's entropy site; ``grids[k]``: its fixed
    (step, zero point). Pairs with w_k = 0 are skipped.
    """
    l_ent = torch.zeros((), dtype=torch.float32, device=device)
    for k in range(len(sites) - 1):
        if weights[k] == 0:
            continue
        d = pair_entropy(sites[k], sites[k + 1], grids[k], grids[k + 1], cfg.a_bits, mask, cfg.soft_temperature,
                         cfg.soft_delta_mode)
        l_ent = l_ent + weights[k] * d.mean()
    return l_ent


def veo_objective(l_reg: torch.Tensor, l_ent: torch.Tensor, l_err: torch.Tensor,
                  veo: VisualEncoderOptimization) -> torch.Tensor:
    """Eq. 10: L = L_reg + lambda1 * L_ent + lambda2 * L_err."""
    return l_reg + veo.lambda1 * l_ent + veo.lambda2 * l_err


def veo_terms(qmodel, chunk: CalibBatch, target: Target, capture: VEOCapture, grids: list[Grid],
              veo: VisualEncoderOptimization, cfg: "QuantConfig",
              weights: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Eq. 10's terms on one (micro-)batch, and the w_k used (recomputed by Eq. 8 when ``weights`` is None)."""
    hidden = core_model(qmodel)(**chunk.model_inputs(), use_cache=False).last_hidden_state
    l_reg = answer_loss(qmodel, hidden, chunk)
    l_err, e_n = output_error(capture.visual(veo.visual_output), hidden, target, chunk.valid, veo.eta)
    if weights is None:
        weights = jacobian_weights(e_n, list(capture.layer_in))
    l_ent = weighted_entropy(capture.site, grids, weights, chunk.valid, cfg, hidden.device)
    capture.clear()
    return {"total": veo_objective(l_reg, l_ent, l_err, veo), "reg": l_reg, "ent": l_ent, "err": l_err}, weights


# ---------------------------------------------------------------------------------- held-out check
@torch.no_grad()
def holdout_error(qmodel, projector: torch.nn.Module, batches: list[CalibBatch], targets: list[Target],
                  veo: VisualEncoderOptimization) -> HeldOutError:
    """Eq. 9's error on held-out pairs: the visual term, the LLM-output term, and L_err = visual + eta * output;
    and where it ends: the answers.

    Each error term is the MSE against the FP model's, averaged over batches weighted by their size.
    ``answer_agree`` is the fraction of (teacher-forced) answer tokens whose most likely token is the
    FP model's, ``answer_kl`` the mean KL(FP || quantized) in nats at those positions, over
    ``answer_tokens`` positions. Why: a lower output error is only worth having if it moves the
    answers; these say whether it does (benchmarks/results/veo_lr.md chose the learning rate by them).
    """
    core = core_model(qmodel)
    head = qmodel.get_output_embeddings()
    visual = output = kl = 0.0
    agree = tokens = 0
    n = sum(b.size for b in batches)
    with VEOCapture(projector) as seen:
        for b, tgt in zip(batches, targets):
            hidden = core(**b.model_inputs(), use_cache=False).last_hidden_state
            visual += float(masked_mse(seen.visual(veo.visual_output), tgt["xv"], None)) * b.size / n
            output += float(masked_mse(hidden, tgt["xn"], b.valid)) * b.size / n
            predicts_answer = torch.zeros_like(b.answer_mask)
            predicts_answer[:, :-1] = b.answer_mask[:, 1:]  # position t predicts token t + 1
            q_logp = F.log_softmax(head(hidden[predicts_answer]).float(), -1)
            if "answer_logp" not in tgt:  # the FP side is the same every epoch: computed once, kept with the targets
                tgt["answer_logp"] = F.log_softmax(head(tgt["xn"][predicts_answer]).float(), -1)
            fp_logp = tgt["answer_logp"]
            agree += int((q_logp.argmax(-1) == fp_logp.argmax(-1)).sum())
            kl += float((fp_logp.exp() * (fp_logp - q_logp)).sum())
            tokens += int(predicts_answer.sum())
    return HeldOutError(visual=visual, output=output, err=visual + veo.eta * output,
                        answer_agree=agree / max(1, tokens), answer_kl=kl / max(1, tokens), answer_tokens=tokens)


class HeldOutCheck:
    """Eq. 9's error on held-out pairs before VEO (epoch 0: the layer-wise init) and after every epoch,
    and the epoch with the lowest one (``VisualEncoderOptimization.early_stopping`` keeps its bounds).

    Why: VEO fits its bounds to the calibration pairs; only unseen images tell whether they generalise.
    """

    def __init__(self, qmodel, qmap: LayerMap, fp_model, fp_map: LayerMap, batches: list[CalibBatch],
                 veo: VisualEncoderOptimization) -> None:
        self.qmodel, self.projector, self.batches, self.veo = qmodel, qmap.projector, batches, veo
        self.targets = fp_targets(fp_model, fp_map, batches, veo.visual_output) if batches else []
        self.log: list[VeoEpoch] = []
        self.best_epoch, self.best_err = 0, math.inf
        self.best_state: list[torch.Tensor] | None = None
        """The trained parameters after ``best_epoch``; None while the init (epoch 0) is best."""

    @property
    def early_stopping(self) -> bool:
        return bool(self.batches) and self.veo.early_stopping

    def error(self) -> HeldOutError:
        return holdout_error(self.qmodel, self.projector, self.batches, self.targets, self.veo)

    def measure_init(self, vision_qs: list["ActQuantizer"]) -> None:
        """Epoch 0, and VEO's ceiling: the same pairs with the vision activations unquantized."""
        init = self.error()
        self.best_err = init.err
        for q in vision_qs:
            q.enabled = False
        try:
            self.log.append(VeoEpoch(0, init, vision_acts_fp=self.error()))
        finally:
            for q in vision_qs:
                q.enabled = True

    def measure_epoch(self, epoch: int, params: list[torch.nn.Parameter]) -> None:
        row = VeoEpoch(epoch, self.error())
        self.log.append(row)
        if row.err < self.best_err:
            self.best_epoch, self.best_err = epoch, row.err
            self.best_state = [p.detach().clone() for p in params]

    @torch.no_grad()
    def restore_best(self, params: list[torch.nn.Parameter], ln_params: list[torch.nn.Parameter],
                     ln_start: list[torch.Tensor]) -> None:
        """With early stopping, put back the parameters of the best epoch (the LayerNorms' start for epoch 0)."""
        if self.early_stopping and self.best_epoch < self.veo.epochs:
            if self.best_state is None:
                for p, p0 in zip(ln_params, ln_start):
                    p.copy_(p0)
            else:
                for p, p_best in zip(params + ln_params, self.best_state):
                    p.copy_(p_best)
        kept = self.best_epoch if self.early_stopping else self.veo.epochs
        self.log = [replace(row, kept=row.epoch == kept) for row in self.log]


# ---------------------------------------------------------------------------------- the loop
def _checkpoint_layers(layers: list[torch.nn.Module]) -> None:
    """Run each decoder layer under non-reentrant activation checkpointing (recomputed in backward).

    Why: VEO backpropagates through the whole LLM, and without this every layer's activations are
    kept for the backward pass. Non-reentrant checkpointing keeps the autograd graph (hooks that
    capture tensors inside a layer, e.g. the entropy site, still get gradients); the layers are
    deterministic, so the recomputation reproduces the forward exactly.
    """
    from torch.utils.checkpoint import checkpoint

    for layer in layers:
        original = layer.forward

        def forward(*args, _original=original, **kwargs):
            return checkpoint(_original, *args, use_reentrant=False, **kwargs)

        layer.forward = forward


def _restore_layers(layers: list[torch.nn.Module]) -> None:
    for layer in layers:
        layer.__dict__.pop("forward", None)


def vision_act_quantizers(qmap: LayerMap) -> list["ActQuantizer"]:
    """The activation quantizers of the vision tower that hold what VEO trains: calibrated bounds, or a dynamic
    range's clip factor."""
    return [lin.act for entry in qmap.vision for lin in entry.linears.values()
            if getattr(lin, "act", None) is not None and lin.act.trainable]


def vision_layernorm_parameters(qmap: LayerMap) -> list[torch.nn.Parameter]:
    """The vision LayerNorms' affine parameters, made trainable (``veo_params="act_bounds+layernorm"``)."""
    params = []
    for entry in qmap.vision:
        for mod in entry.module.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                for p in mod.parameters():
                    p.requires_grad_(True)
                    params.append(p)
    return params


def micro_batch_targets(fp_model, fp_map: LayerMap, batches: list[CalibBatch],
                        veo: VisualEncoderOptimization) -> tuple[list[list[CalibBatch]], list[list[Target]]]:
    """Each batch cut into ``veo.micro_batch``-pair pieces, and the FP targets of every piece.

    The cut comes before the targets are taken, so each target has its piece's layout (LLaVA-NeXT's
    projector output is not row-aligned with the batch).
    """
    chunks = [b.split(veo.micro_batch) if veo.micro_batch else [b] for b in batches]
    flat_targets = iter(fp_targets(fp_model, fp_map, [c for cs in chunks for c in cs], veo.visual_output))
    return chunks, [[next(flat_targets) for _ in cs] for cs in chunks]


def train_step(qmodel, opt: torch.optim.Optimizer, batch: CalibBatch, chunks: list[CalibBatch],
               targets: list[Target], capture: VEOCapture, grids: list[Grid], veo: VisualEncoderOptimization,
               cfg: "QuantConfig", weights: torch.Tensor | None, new_weights: bool, cancel=None) -> tuple[dict[str, float], torch.Tensor]:
    """One optimizer step on one calibration batch, gradients accumulated over its micro-batches.

    Returns the batch's loss terms (each a pair-weighted mean over the micro-batches) and the w_k
    used; with ``new_weights`` they are recomputed on the first micro-batch.
    """
    opt.zero_grad(set_to_none=True)
    sums = dict.fromkeys(LOSS_TERMS, 0.0)
    for ci, (chunk, tgt) in enumerate(zip(chunks, targets)):
        check_cancel(cancel, "quantization")
        share = chunk.size / batch.size
        terms, weights = veo_terms(qmodel, chunk, tgt, capture, grids, veo, cfg,
                                   None if ci == 0 and new_weights else weights)
        (terms["total"] * share).backward()
        for key, value in terms.items():
            sums[key] += value.item() * share
    opt.step()
    return sums, weights


def optimize_vision_bounds(qmodel, qmap: LayerMap, fp_model, fp_map: LayerMap, batches: list[CalibBatch],
                           veo: VisualEncoderOptimization, cfg: "QuantConfig", grids: list[Grid], progress=None,
                           cancel=None,
                           holdout: list[CalibBatch] | None = None) -> tuple[list[dict], list[dict]]:
    """Optimise the vision quantizers in place by Eq. 10; returns (per-step loss log, held-out log).

    ``grids[k]`` is the fixed (step, zero point) of decoder layer k's entropy site. With
    ``holdout`` batches, Eq. 9's error on them is measured before training (epoch 0: the
    layer-wise init) and after every epoch; with ``veo.early_stopping`` the bounds of the
    epoch with the lowest held-out error are kept (epoch 0 restores the init's ranges exactly).
    Progress: one step per optimizer step and per held-out check; 1.0 once the last is done.
    """
    vision_qs = vision_act_quantizers(qmap)
    if not vision_qs or veo.epochs == 0:
        report(progress, STAGE_VEO, 1.0, "nothing to train")
        return [], []
    check = HeldOutCheck(qmodel, qmap, fp_model, fp_map, holdout or [], veo)
    steps = StepProgress(progress, STAGE_VEO, veo.epochs * len(batches) + (veo.epochs + 1) * bool(holdout))
    if holdout:
        check.measure_init(vision_qs)
        steps.step("held-out check, epoch 0")
    init_state = [_settings_of(q) for q in vision_qs]
    chunks, targets = micro_batch_targets(fp_model, fp_map, batches, veo)
    params = [p for q in vision_qs for p in q.make_learnable()]
    ln_params = vision_layernorm_parameters(qmap) if veo.params == "act_bounds+layernorm" else []
    ln_start = [p.detach().clone() for p in ln_params]
    groups = [{"params": params, "lr": veo.lr}]
    if ln_params:
        groups.append({"params": ln_params, "lr": veo.lr * 0.1})
    opt = torch.optim.Adam(groups)
    decoder_layers = [e.module for e in qmap.language]
    sites = [e.linears["q"] if cfg.entropy_site == "attn_input" and "q" in e.linears else e.module
             for e in qmap.language]
    if veo.checkpoint:
        _checkpoint_layers(decoder_layers)
    log: list[VeoStep] = []
    weights: torch.Tensor | None = None
    try:
        with VEOCapture(qmap.projector, decoder_layers, sites) as capture, torch.enable_grad():
            for epoch in range(1, veo.epochs + 1):
                for bi, batch in enumerate(batches):
                    new_weights = weights is None or len(log) % veo.jacobian_every == 0
                    sums, weights = train_step(qmodel, opt, batch, chunks[bi], targets[bi], capture, grids, veo,
                                               cfg, weights, new_weights, cancel)
                    log.append(VeoStep(step=len(log) + 1, epoch=epoch, **sums))
                    if not math.isfinite(sums["total"]):
                        raise RuntimeError("VEO diverged (non-finite loss); lower veo_lr (VisualEncoderOptimization.lr)")
                    steps.step(f"epoch {epoch}/{veo.epochs}")
                if holdout:
                    check.measure_epoch(epoch, params + ln_params)
                    capture.clear()
                    steps.step(f"held-out check, epoch {epoch}")
        check.restore_best(params, ln_params, ln_start)
    finally:
        if veo.checkpoint:
            _restore_layers(decoder_layers)
        for q in vision_qs:
            q.freeze()
        for p in ln_params:
            p.requires_grad_(False)
    if check.early_stopping and check.best_epoch == 0:
        for q, state in zip(vision_qs, init_state):  # exactly the init's ranges, not their log round trip
            _restore(q, state)
    return log, check.log


def _settings_of(q: "ActQuantizer") -> tuple[torch.Tensor, ...]:
    """What VEO trains in ``q``, as it stands: its bounds, or its clip factor."""
    return (q.get_clip().clone(),) if q.dynamic else tuple(t.clone() for t in q.get_range())


def _restore(q: "ActQuantizer", state: tuple[torch.Tensor, ...]) -> None:
    if q.dynamic:
        q.set_clip(state[0])
    else:
        q.set_range(*state)
