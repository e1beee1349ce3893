"""The first sentence of every Analysis view, in words a student reads, computed from the numbers.

Each function takes the plain data a view draws (lists and dicts, as :class:`qvlm.quant.QuantResult`
and :mod:`qvlm.evaluation.analysis` give them) and says what it shows and what the current numbers
mean. A figure and its text that show the same quantity read it from one function here
(:func:`~qvlm.evaluation.analysis.veo_outcome` feeds both the VEO plot's title and the VEO text), so they
cannot disagree.
No gradio and no plotting here: the plots and the panels both import it.
"""

from __future__ import annotations

from collections.abc import Sequence

from qvlm.evaluation.analysis import VEO_SHARE_NEGLIGIBLE, DedPoint, InteractionCounts, PairSummary, VeoOutcome
from qvlm.evaluation.modality import ModalityRow
from qvlm.evaluation.vision_sites import SiteError, SiteMap
from qvlm.quant.records import LayerError
from qvlm.utils.stats import finite

INTERACTION_LEGEND = (
    "**How to read the table.** *interaction share %*: the part of the pair's error that is not simply "
    "layer k's error plus layer k+1's (under 10%: they add up). *joint = greedy?*: whether choosing both ranges "
    "together picked the same as choosing them one at a time. *DED = 0 share %*: the samples on which the joint "
    "choice saved nothing. *DED / controllable*: what the joint choice saved, as a share of the error that "
    "clipping ranges can change at all. *controllable share %*: how much of the pair's error the clipping ranges "
    "can change (the rest comes from rounding the weights and the inputs). *gain*: how strongly the first layer "
    "passes on an error that reaches it (1: unchanged, above 1: amplified). *branch response*: the same for the "
    "layer's own update f(x) − x alone. *R² entropy→DED*: how well the entropy D(k,k+1) predicts each sample's "
    "saving (1: perfectly, 0: not at all); *R² chance level*: the R² that pure noise reaches one time in twenty "
    "with this many samples, so only an R² above it means something."
)
"""The legend under the interaction table: every expert column in one plain clause."""


# ---------------------------------------------------------------------------- VEO
def veo_sentence(outcome: VeoOutcome | None) -> str:
    """VEO's result in words: what happened on unseen images, then whether the answers followed."""
    if outcome is None:
        return "VEO: it measured no held-out images in this run (veo_holdout_images = 0), so nothing can be said."
    o = outcome
    if o.kept_epoch == 0:
        error = (f"no epoch lowered the error on images it never saw (Eq. 9's held-out error {o.error_phrase}), "
                 f"so VEO kept the layer-wise ranges (epoch 0 of {o.epochs})")
    else:
        went = "fell" if o.error_after < o.error_before else "rose"
        error = (f"on images it never saw, the error it minimizes (Eq. 9's held-out error) {went}, "
                 f"{o.error_phrase}; epoch {o.kept_epoch} of {o.epochs} kept")
    share = o.vision_share
    if share is None:
        return f"VEO: {error}."
    kl = (f"KL(FP ‖ quantized) per answer token {o.kl_before:.3g} → {o.kl_after:.3g} nats; with the vision "
          f"activations unquantized it would be {o.kl_unquantized:.3g}")
    closer = "closer to" if o.kl_after < o.kl_before else "further from" if o.kl_after > o.kl_before else "as far from"
    answers = f"The answers moved {closer} the full-precision model's ({kl})"
    if share < VEO_SHARE_NEGLIGIBLE:
        return (f"VEO: {error}. {answers}. Quantizing the vision activations causes only {100 * max(share, 0):.0f}% "
                "of that divergence, so on this model VEO can hardly change the answers, whatever it does to the "
                "error.")
    removed = (o.kl_before - o.kl_after) / (o.kl_before - o.kl_unquantized)
    if removed >= 1:
        part = "VEO removed all of that part"
    elif removed >= 0:
        part = f"VEO removed {100 * removed:.0f}% of that part"
    else:
        part = f"VEO made that part {100 * -removed:.0f}% larger"
    return (f"VEO: {error}. {answers}. Quantizing the vision activations causes {100 * share:.0f}% of that "
            f"divergence; {part}.")


def veo_lead(outcome: VeoOutcome | None) -> str:
    """One plain sentence above the VEO plot."""
    if outcome is None:
        return ("The curves are VEO's training loss per step; no held-out images were measured, so they cannot "
                "say whether it helps on new images.")
    o = outcome
    if o.kept_epoch == 0:
        return ("VEO tuned the vision tower's clipping ranges, but none of its epochs helped on new images, "
                "so the app kept the ranges it started with.")
    better = o.error_after < o.error_before
    lead = (f"VEO tuned the vision tower's clipping ranges and its error on new images "
            f"{'fell' if better else 'rose'} by {abs(o.error_change):.0f}%")
    if o.kl_before is None or o.kl_after is None:
        return lead + "."
    follow = o.kl_after < o.kl_before
    joint = "and" if follow == better else "but"
    return lead + f", {joint} the answers moved {'closer to' if follow else 'further from'} the full-precision model's."


# ---------------------------------------------------------------------------- the other views
def partition_lead(entropies: Sequence[float], blocks: Sequence[Sequence[int]], h0: float | None) -> str:
    """One sentence on the block partition: how many layers were grouped, and why."""
    if not entropies:
        return ("This variant has no CDM step, so every decoder layer chose its clipping range on its own; "
                "quantize with the qvlm or qvlm-cdm recipe to see layers grouped.")
    n_layers = len(entropies) + 1
    joint = [b for b in blocks if len(b) > 1]
    above = sum(e > h0 for e in entropies) if finite(h0) else 0
    if not joint:
        return (f"No two neighbouring layers depend on each other strongly enough (D above h0 = {h0:.3g}), so "
                f"each of the {n_layers} decoder layers chose its clipping range alone.")
    grouped = sum(len(b) for b in joint)
    return (f"{above} of {len(entropies)} neighbouring layer pairs depend on each other strongly (D above "
            f"h0 = {h0:.3g}), so the {n_layers} decoder layers form {len(blocks)} blocks, and in the {len(joint)} "
            f"that hold {grouped} layers between them the clipping ranges were chosen together.")


def layer_error_lead(rows: Sequence[LayerError]) -> str:
    """One sentence on the per-layer error of the chosen variant: the worst layer and what the search bought."""
    rows = [r for r in rows if finite(r.quant_mse)]
    if not rows:
        return ""
    relative = all(r.fp_mse > 0 for r in rows)

    def size(r: LayerError, key: str = "quant_mse") -> float:
        return getattr(r, key) / r.fp_mse if relative else getattr(r, key)

    worst = max(rows, key=size)
    name = f"{'V' if worst.tower == 'vision' else 'L'}{worst.index}"
    where = (f"{100 * size(worst):.2g}% of that layer's own output" if relative
             else f"an output MSE of {size(worst):.3g}")
    lead = f"Each bar is how far a layer's output drifts from the full-precision model; the worst is {name}, at {where}"
    inits = [r for r in rows if finite(r.init_mse)]
    better = sum(r.quant_mse < r.init_mse for r in inits)
    if better:
        lead += f", and VEO and the search brought {better} of {len(inits)} layers below their error after the init"
    return lead + "."


def ded_lead(points: Sequence[DedPoint], r2: float | None, r2_chance: float | None) -> str:
    """One sentence on DED vs entropy: does the cheap entropy predict how much the joint search helps?"""
    deds = [p.ded for p in points if finite(p.ded)]
    if not deds:
        return ""
    if max(abs(d) for d in deds) == 0:
        return ("Choosing these two layers' ranges together gave exactly the same result as one at a time on "
                f"every one of the {len(deds)} samples, so there is nothing for the entropy to predict here.")
    if not finite(r2):
        return ""
    if finite(r2_chance) and r2 <= r2_chance:
        return (f"The entropy does not predict which samples gain from the joint choice here: its R² of "
                f"{r2:.4f} is below {r2_chance:.2f}, what pure noise reaches one time in twenty with "
                f"{len(deds)} samples, so the line is no better than a guess.")
    chance = f", above the {r2_chance:.2f} that noise alone reaches" if finite(r2_chance) else ""
    return (f"The higher the entropy D, the more the joint choice of both layers' ranges saves (R² {r2:.4f}{chance}): "
            "the cheap entropy is a fair guide to where the expensive joint search pays, as in the paper's Fig. 2.")


def interaction_lead(pairs: Sequence[PairSummary]) -> str:
    """One sentence on "Do the layers interact?": do neighbouring layers' errors add up or not?"""
    rows = [p for p in pairs if finite(p.interaction_share)]
    if not rows:
        return ""
    top = max(rows, key=lambda p: p.interaction_share)
    name = f"L{top.block[0]}–L{top.block[-1]}"
    counts = InteractionCounts.of(rows)
    if not counts.interacting:
        same = ("choosing them together picked the same ranges for every pair" if counts.differs == 0 else
                f"choosing them together changed the choice for only {counts.differs} of {len(rows)} pairs")
        return (f"These layers' errors add up (at most {100 * top.interaction_share:.1f}% is not a plain "
                f"sum, at {name}), so searching their ranges together cannot help much: {same}.")
    return (f"{counts.interacting} of {len(rows)} neighbouring layer pairs interact (most: {name}, where "
            f"{100 * top.interaction_share:.1f}% of the error is not the sum of the two layers' own), so "
            f"choosing their ranges together can help there; it changed the choice for {counts.differs} of {len(rows)} pairs.")


def modality_lead(rows: Sequence[ModalityRow]) -> str:
    """One sentence on image vs text tokens: does one clipping range fit both?"""
    ratios = [(r.ratio, r.layer) for r in rows if r.ratio is not None]
    if not ratios:
        return ""
    (lo, _), (hi, at) = min(ratios), max(ratios)
    if hi <= 2 and lo >= 0.5:
        return (f"Image and text tokens reach similar sizes at every decoder layer (image / text from {lo:.2f} to "
                f"{hi:.2f}), so one clipping range serves both.")
    big = f"up to {hi:.2f} times larger than text tokens (at L{at})" if hi > 2 else f"as small as {lo:.2f} times text"
    return (f"Image tokens are {big}: one clipping range shared by both either cuts the large values or wastes "
            "rounding levels on the small ones.")


# ---------------------------------------------------------------------------- where the vision tower loses
SITE_NAMES = {"qkv": "q/k/v input", "out_proj": "out_proj input", "fc1": "fc1 input", "fc2": "fc2 input"}
"""How the sentences and the chart name each vision site of :mod:`qvlm.evaluation.vision_sites`."""


def vision_site_name(row: SiteError) -> str:
    """"V2 fc2 input": the vision layer and the site, as the chart's axis and the lead name them."""
    return f"V{row.layer} {SITE_NAMES.get(row.site, row.site)}"


def vision_sites_lead(rows: Sequence[SiteError]) -> str:
    """One sentence on the vision sites: which one's activation rounding costs the tower's output most."""
    rows = [r for r in rows if finite(r.error)]
    if not rows or max(r.error for r in rows) <= 0:
        return ("No vision site's activation rounding changes the image tokens the LLM sees measurably: "
                "the tower's error comes from its weights.") if rows else ""
    worst = max(rows, key=lambda r: r.error)
    return (f"Layer {worst.layer}'s {SITE_NAMES.get(worst.site, worst.site)} loses the most: "
            f"{100 * worst.share:.0f}% of the error the vision tower's activation rounding adds, "
            f"site by site, to the image tokens the LLM sees.")


def site_map_sentence(m: SiteMap | None) -> str:
    """What the heatmap shows: how many rounding levels a typical value spans with each kind of range."""
    if m is None:
        return ""
    token, channel = m.levels_token, m.levels_channel
    spans = (f"At V{m.layer}'s {SITE_NAMES.get(m.site, m.site)}, a typical value spans {token:.2g} "
             f"of the {2 ** m.bits} levels with a static range per token and {channel:.2g} with one per "
             "channel")
    if token < channel:
        return (spans + ": a few channels are large in every token, so each token's range stretches to cover "
                "them and the other channels round coarsely.")
    return spans + ": here per-token ranges waste no more levels than per-channel ones."
