"""Visual encoder optimization (paper §3.3, Eqs. 8-10; design note §5.3).

Trainable: the vision tower's activation-quantizer bounds (log-magnitudes, STE through round),
optionally the vision LayerNorm affine parameters. Frozen: every weight, the projector, and the
whole LLM including its (already initialised) activation quantizers.

    L     = L_reg + lambda1 * L_ent + lambda2 * L_err                          (Eq. 10)
    L_reg = next-token cross-entropy on the answer tokens (teacher forcing)
    L_ent = sum_k w_k * D_soft(k, k+1)                                         (Eq. 8, sign corrected:
            the paper's  sum p log p  is -D; adding it would *maximise* entropy, against the text)
    w_k   = || dE / dX^(k) ||, E = ||X_q^(n) - X_r^(n)||^2, normalised to sum 1, detached
    L_err = MSE(X_q^v, X_r^v) + eta * MSE(X_q^(n), X_r^(n))                    (Eq. 9, norms as MSE)

X^v is the projector output (the image tokens the LLM sees) or the selected vision features;
X^(n) is the LLM's last hidden state (after the final norm, before lm_head).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from qvlm.models import core_model
from qvlm.utils.progress import STAGE_VEO, check_cancel, report
from qvlm.data import get_task
from qvlm.quant.calibration import CalibBatch, build_batches, calibration_batches, masked_mse
from qvlm.quant.entropy import pair_entropy

if TYPE_CHECKING:
    from qvlm.quant.config import QuantConfig
    from qvlm.quant.run import QuantRun


@dataclass(frozen=True)
class VisualEncoderOptimization:
    """Eqs. 8-10: learn the vision tower's activation bounds against the FP model.

    Its settings are the ``veo_*`` fields of the run's :class:`~qvlm.quant.config.QuantConfig`
    (epochs, lr, lambda1, lambda2, eta, what is trained, micro-batches, checkpointing).
    """

    name: ClassVar[str] = STAGE_VEO

    def run(self, qrun: "QuantRun") -> None:
        cfg = qrun.config
        if not cfg.quantize_vision:
            return
        with qrun.timed(STAGE_VEO):
            batches = qrun.batches
            if cfg.veo_calib_size is not None and qrun.calibration is None:
                batches = calibration_batches(qrun.fp, cfg.veo_calib_size, cfg.calib_seed, cfg.calib_batch)
            holdout = []
            if cfg.veo_holdout_images and qrun.calibration is None:
                task = get_task(qrun.fp.task)
                seen = {s.image_id for s in task.calibration_split(max(cfg.calib_size, cfg.veo_calib_size or 0),
                                                                   cfg.calib_seed)}
                samples = task.holdout_split(cfg.veo_holdout_images, seen, cfg.calib_seed + 1)
                holdout = build_batches(qrun.fp.processor, samples, cfg.calib_batch, qrun.fp.device, qrun.fp.dtype)
            qrun.veo_losses, qrun.veo_holdout = optimize_vision_bounds(
                qrun.qmodel, qrun.fp.model, qrun.qmap, batches, cfg, qrun.entropy_grids(), qrun.progress,
                qrun.cancel, holdout)


@torch.no_grad()
def holdout_error(qmodel, batches: list[CalibBatch], targets: list[dict[str, torch.Tensor]],
                  cfg: "QuantConfig") -> dict[str, float]:
    """Eq. 9's error on held-out pairs: the visual term, the LLM-output term, and L_err = visual + eta * output;
    and where it ends: the answers.

    Each error term is the MSE against the FP model's, averaged over batches weighted by their size.
    ``answer_agree`` is the fraction of (teacher-forced) answer tokens whose most likely token is the
    FP model's, ``answer_kl`` the mean KL(FP || quantized) in nats at those positions, over
    ``answer_tokens`` positions. Why: a lower output error is only worth having if it moves the
    answers; these say whether it does (issue 16).
    """
    core = core_model(qmodel)
    head = qmodel.get_output_embeddings()
    seen: dict[str, torch.Tensor] = {}

    def hook(module, args, output):
        seen["in"], seen["out"] = args[0], output

    handle = core.multi_modal_projector.register_forward_hook(hook)
    visual = output = kl = 0.0
    agree = tokens = 0
    n = sum(b.size for b in batches)
    try:
        for b, tgt in zip(batches, targets):
            hidden = core(**b.model_inputs(), use_cache=False).last_hidden_state
            xv = seen["out"] if cfg.veo_visual_output == "projector" else seen["in"]
            visual += float(masked_mse(xv, tgt["xv"], None)) * b.size / n
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
    finally:
        handle.remove()
    return {"visual": visual, "output": output, "err": visual + cfg.veo_eta * output,
            "answer_agree": agree / max(1, tokens), "answer_kl": kl / max(1, tokens), "answer_tokens": tokens}


@torch.no_grad()
def fp_targets(fp_model, batches: list[CalibBatch], visual_output: str) -> list[dict[str, torch.Tensor]]:
    """X_r^v and X_r^(n) per batch, from the FP model.

    X^v is taken with a hook on the projector (its output, or its input for "vision"), exactly
    where the quantized path's X_q^v is taken, so both have the same layout in every family
    (LLaVA-NeXT tiles and re-packs image features after the projector).
    """
    core = core_model(fp_model)
    captured: dict[str, torch.Tensor] = {}

    def hook(_module, args, output):
        captured["in"], captured["out"] = args[0], output

    handle = core.multi_modal_projector.register_forward_hook(hook)
    out = []
    try:
        for b in batches:
            hidden = core(**b.model_inputs(), use_cache=False).last_hidden_state
            xv = captured["out"] if visual_output == "projector" else captured["in"]
            out.append({"xv": xv.detach(), "xn": hidden.detach()})
    finally:
        handle.remove()
    return out


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


def optimize_vision_bounds(qmodel, fp_model, qmap, batches: list[CalibBatch], cfg: "QuantConfig",
                           grids: list[tuple[torch.Tensor, torch.Tensor]], progress=None,
                           cancel=None, holdout: list[CalibBatch] | None = None) -> tuple[list[dict], list[dict]]:
    """Optimise the vision quantizers in place by Eq. 10; returns (per-step loss log, held-out log).

    ``grids[k]`` is the fixed (step, zero point) of decoder layer k's entropy site. With
    ``holdout`` batches, Eq. 9's error on them is measured before training (epoch 0: the
    layer-wise init) and after every epoch; with ``cfg.veo_early_stopping`` the bounds of the
    epoch with the lowest held-out error are kept (epoch 0 restores the init's ranges exactly).
    """
    vision_qs = [lin.act for entry in qmap.vision for lin in entry.linears.values()
                 if getattr(lin, "act", None) is not None and lin.act.calibrated]
    if not vision_qs or cfg.veo_epochs == 0:
        return [], []
    holdout = holdout or []
    holdout_targets = fp_targets(fp_model, holdout, cfg.veo_visual_output) if holdout else []
    holdout_log = [{"epoch": 0, **holdout_error(qmodel, holdout, holdout_targets, cfg)}] if holdout else []
    if holdout:  # VEO's ceiling: the same pairs with the vision activations unquantized
        for q in vision_qs:
            q.enabled = False
        try:
            holdout_log[0]["vision_acts_fp"] = holdout_error(qmodel, holdout, holdout_targets, cfg)
        finally:
            for q in vision_qs:
                q.enabled = True
    init_ranges = [tuple(t.clone() for t in q.get_range()) for q in vision_qs]
    # Micro-batches are cut before the FP targets are taken, so each target has its chunk's layout
    # (LLaVA-NeXT's projector output is not row-aligned with the batch).
    chunks = [b.split(cfg.veo_micro_batch) if cfg.veo_micro_batch else [b] for b in batches]
    flat_targets = iter(fp_targets(fp_model, [c for cs in chunks for c in cs], cfg.veo_visual_output))
    targets = [[next(flat_targets) for _ in cs] for cs in chunks]
    params: list[torch.nn.Parameter] = []
    for q in vision_qs:
        params += q.make_learnable()
    ln_params: list[torch.nn.Parameter] = []
    best = {"epoch": 0, "err": holdout_log[0]["err"] if holdout_log else math.inf, "state": None}
    if cfg.veo_params == "act_bounds+layernorm":
        for entry in qmap.vision:
            for mod in entry.module.modules():
                if isinstance(mod, torch.nn.LayerNorm):
                    for p in mod.parameters():
                        p.requires_grad_(True)
                        ln_params.append(p)
    ln_start = [p.detach().clone() for p in ln_params]
    groups = [{"params": params, "lr": cfg.veo_lr}]
    if ln_params:
        groups.append({"params": ln_params, "lr": cfg.veo_lr * 0.1})
    opt = torch.optim.Adam(groups)

    core = core_model(qmodel)
    decoder_layers = [e.module for e in qmap.language]
    site_modules = [e.linears["q"] if cfg.entropy_site == "attn_input" and "q" in e.linears else e.module
                    for e in qmap.language]

    captured: dict[str, list] = {"layer_in": [None] * len(decoder_layers), "site": [None] * len(decoder_layers)}

    def layer_hook(i):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            captured["layer_in"][i] = h
        return hook

    def site_hook(i):
        def hook(module, args, kwargs):
            captured["site"][i] = args[0] if args else kwargs["hidden_states"]
        return hook

    proj_io: dict[str, torch.Tensor] = {}

    def proj_hook(module, args, output):
        proj_io["in"], proj_io["out"] = args[0], output

    if cfg.veo_checkpoint:
        _checkpoint_layers(decoder_layers)
    handles = [m.register_forward_pre_hook(layer_hook(i), with_kwargs=True) for i, m in enumerate(decoder_layers)]
    handles += [m.register_forward_pre_hook(site_hook(i), with_kwargs=True) for i, m in enumerate(site_modules)]
    handles.append(core.multi_modal_projector.register_forward_hook(proj_hook))
    log: list[dict] = []
    weights: torch.Tensor | None = None
    total_steps = cfg.veo_epochs * len(batches)
    step = 0

    def loss_terms(chunk: CalibBatch, tgt: dict[str, torch.Tensor], new_weights: bool) -> dict[str, torch.Tensor]:
        """Eq. 10's terms on one (micro-)batch; recomputes the Jacobian weights w_k when asked."""
        nonlocal weights
        hidden = core(**chunk.model_inputs(), use_cache=False).last_hidden_state
        mask = chunk.valid
        # L_reg: next-token CE on the answer tokens.
        pos = chunk.answer_mask.nonzero(as_tuple=False)
        logits = qmodel.lm_head(hidden[pos[:, 0], pos[:, 1] - 1])
        l_reg = F.cross_entropy(logits.float(), chunk.input_ids[pos[:, 0], pos[:, 1]])
        e_n = masked_mse(hidden, tgt["xn"], mask)
        xv = proj_io["out"] if cfg.veo_visual_output == "projector" else proj_io["in"]
        l_err = masked_mse(xv, tgt["xv"], None) + cfg.veo_eta * e_n
        if new_weights:  # w_k (detached), from dE/dX^(k)
            ins = list(captured["layer_in"])
            usable = [h is not None and h.requires_grad for h in ins]
            grads = torch.autograd.grad(e_n, [h for h, u in zip(ins, usable) if u], retain_graph=True,
                                        allow_unused=True)
            norms, gi = [], iter(grads)
            for u in usable:
                g = next(gi) if u else None
                norms.append(0.0 if g is None else float(g.float().norm()))
            w = torch.tensor(norms)
            weights = w / w.sum() if float(w.sum()) > 0 else torch.full_like(w, 1.0 / max(1, len(w)))
        l_ent = hidden.new_zeros((), dtype=torch.float32)
        for k in range(len(decoder_layers) - 1):
            if weights[k] == 0:
                continue
            d = pair_entropy(captured["site"][k], captured["site"][k + 1], grids[k], grids[k + 1],
                             cfg.a_bits, mask, cfg.soft_temperature, cfg.soft_delta_mode)
            l_ent = l_ent + weights[k] * d.mean()
        captured["layer_in"] = [None] * len(decoder_layers)
        captured["site"] = [None] * len(decoder_layers)
        total = l_reg + cfg.veo_lambda1 * l_ent + cfg.veo_lambda2 * l_err
        return {"total": total, "reg": l_reg, "ent": l_ent, "err": l_err}

    try:
        with torch.enable_grad():
            for epoch in range(cfg.veo_epochs):
                for bi, batch in enumerate(batches):
                    opt.zero_grad(set_to_none=True)
                    sums = dict.fromkeys(("total", "reg", "ent", "err"), 0.0)
                    for ci, (chunk, tgt) in enumerate(zip(chunks[bi], targets[bi])):
                        check_cancel(cancel, "quantization")
                        share = chunk.size / batch.size
                        new_weights = ci == 0 and (weights is None or step % cfg.veo_jacobian_every == 0)
                        terms = loss_terms(chunk, tgt, new_weights)
                        (terms["total"] * share).backward()
                        for key, value in terms.items():
                            sums[key] += value.item() * share
                    opt.step()
                    step += 1
                    log.append({"step": step, "epoch": epoch + 1, **sums})
                    if not math.isfinite(sums["total"]):
                        raise RuntimeError("VEO diverged (non-finite loss); lower veo_lr")
                    report(progress, STAGE_VEO, step / total_steps, f"epoch {epoch + 1}/{cfg.veo_epochs}")
                if holdout:
                    row = {"epoch": epoch + 1, **holdout_error(qmodel, holdout, holdout_targets, cfg)}
                    captured["layer_in"] = [None] * len(decoder_layers)
                    captured["site"] = [None] * len(decoder_layers)
                    holdout_log.append(row)
                    if row["err"] < best["err"]:
                        best.update(epoch=epoch + 1, err=row["err"],
                                    state=[p.detach().clone() for p in params + ln_params])
        if holdout and cfg.veo_early_stopping and best["epoch"] < cfg.veo_epochs:
            with torch.no_grad():
                if best["state"] is None:  # epoch 0: the init was best on held-out images
                    for p, p0 in zip(ln_params, ln_start):
                        p.copy_(p0)
                else:
                    for p, p_best in zip(params + ln_params, best["state"]):
                        p.copy_(p_best)
        for row in holdout_log:
            row["kept"] = row["epoch"] == (best["epoch"] if holdout and cfg.veo_early_stopping else cfg.veo_epochs)
    finally:
        for h in handles:
            h.remove()
        if cfg.veo_checkpoint:
            _restore_layers(decoder_layers)
        for q in vision_qs:
            q.freeze()
        for p in ln_params:
            p.requires_grad_(False)
    if holdout and cfg.veo_early_stopping and best["epoch"] == 0:
        for q, (lo, hi) in zip(vision_qs, init_ranges):  # exactly the init's ranges, not their log round trip
            q.set_range(lo, hi)
    return log, holdout_log
