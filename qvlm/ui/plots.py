"""Plotly figures for Q-VLM results, built from plain data (lists and dicts).

No gradio here: the same figures serve the app (through ``gr.Plot``), notebooks and the
benchmark reports. Every function accepts what :class:`qvlm.quant.QuantResult` and
:func:`qvlm.evaluation.analysis.ded_analysis` return, already unpacked, so the plots can be tested
without running a quantization, and an empty input gives a readable placeholder figure
instead of an exception (the UI shows figures before anything has been computed).
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from qvlm.evaluation.analysis import DedPoint, PairSummary, veo_outcome
from qvlm.evaluation.compare import SweepPoint, TokenComparison
from qvlm.evaluation.modality import ModalityRow
from qvlm.evaluation.vision_sites import SiteError, SiteMap
from qvlm.quant.records import LayerError, VeoEpoch, VeoStep
from qvlm.ui.explain import SITE_NAMES, vision_site_name
from qvlm.utils.stats import LinearFit, finite, linear_fit

if TYPE_CHECKING:  # annotations only: the figures take these records, they never build them
    from qvlm.evaluation.accuracy import EvalResult
    from qvlm.evaluation.table4 import Table4Result
    from qvlm.quant.memory import WeightMemory

# A qualitative palette with enough distinct colours for the blocks of a 40-layer model
# (colours repeat after that, but adjacent blocks never share one).
BLOCK_COLORS = (
    "#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2",
    "#EECA3B", "#B279A2", "#FF9DA6", "#9D755D", "#BAB0AC",
)
FP_COLOR = "#444444"
_LAYOUT = dict(template="plotly_white", margin=dict(l=60, r=20, t=60, b=50), height=380)
LOG_AXIS = dict(type="log", dtick=1, tickformat="~g")
"""A log axis with one tick per power of ten (0.01, 0.1, 1, 10, ...), not plotly's "2, 5, 1, 2, 5"."""


def empty_figure(message: str, title: str = "") -> go.Figure:
    """A blank figure carrying a message: what to do to fill it."""
    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font=dict(size=14, color="#666"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(title=title, **_LAYOUT)
    return fig


def ded_scatter(
    points: Sequence[DedPoint],
    layer: int,
    x_key: str = "entropy",
    fit: LinearFit | None = None,
    title: str | None = None,
    r2_chance: float | None = None,
) -> go.Figure:
    """DED against a proxy (entropy, or quantization error with ``x_key="qerr"``), one dot per sample.

    Mirrors the paper's Fig. 2 (entropy) and Fig. 5a (quantization error): the fitted line is
    drawn over the points and ``R² = ...`` is written on the plot. ``fit`` is the analysis' own
    regression of DED on the proxy; it is recomputed here when absent. ``r2_chance`` (the R² that
    chance alone exceeds one time in twenty for this many samples) is written beside it, so a
    reader can tell a fit from noise.
    """
    proxy = {"entropy": "activation entropy D(k,k+1)", "qerr": "quantization error"}.get(x_key, x_key)
    title = title or f"Decoder layer {layer}: DED vs {proxy}"
    pts = [p for p in points if finite(getattr(p, x_key)) and finite(p.ded)]
    if not pts:
        return empty_figure("No DED samples for this layer yet.", title)
    xs = [float(getattr(p, x_key)) for p in pts]
    ys = [p.ded for p in pts]
    fit = fit or linear_fit(xs, ys)
    color = "#4C78A8" if x_key == "entropy" else "#E45756"
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=xs, y=ys, mode="markers", name="calibration sample",
        marker=dict(size=9, color=color, opacity=0.75, line=dict(width=0.5, color="white")),
        customdata=[p.sample for p in pts],
        hovertemplate=f"sample %{{customdata}}<br>{proxy}: %{{x:.4g}}<br>DED: %{{y:.4g}}<extra></extra>",
    ))
    lo, hi = min(xs), max(xs)
    fig.add_trace(go.Scatter(
        x=[lo, hi], y=[fit.at(lo), fit.at(hi)],
        mode="lines", name="least-squares fit", line=dict(color="#222", width=2, dash="dash"), hoverinfo="skip",
    ))
    r2_text = f"R² = {fit.r2:.4f}"
    if finite(r2_chance):
        r2_text += f" (chance level {float(r2_chance):.2f} for n = {len(pts)})"
    fig.add_annotation(text=r2_text, x=0.03, y=0.97, xref="paper", yref="paper",
                       xanchor="left", yanchor="top", showarrow=False, font=dict(size=16),
                       bgcolor="rgba(255,255,255,0.8)")
    if max(abs(y) for y in ys) == 0:
        fig.add_annotation(text="DED = 0 for every sample: the layer-by-layer and the joint search<br>"
                                "chose the same ranges here (no cross-layer dependency to exploit).",
                           x=0.5, y=0.15, xref="paper", yref="paper", showarrow=False, font=dict(size=12, color="#666"))
    fig.update_layout(title=title, xaxis_title=proxy, yaxis_title="DED (layer-wise − joint error)",
                      showlegend=False, **_LAYOUT)
    return fig


def interaction_figure(
    pairs: Sequence[PairSummary],
    threshold: float = 0.10,
    title: str = "Do the layers interact? Interaction share per decoder pair",
) -> go.Figure:
    """Bars of the interaction share (%) of each adjacent decoder pair, a dashed line at ``threshold``.

    ``pairs``: :attr:`qvlm.evaluation.analysis.DependencyReport.summaries`. The share is the part of the block error's variance over the
    candidate grid that an additive model leaves: 0 means the two layers' errors simply add up,
    so choosing their ranges one by one is as good as choosing them together.
    """
    rows = [p for p in pairs if finite(p.interaction_share)]
    if not rows:
        return empty_figure("Press 'Do the layers interact?' to measure every decoder pair.", title)
    names = [f"L{p.block[0]}–L{p.block[-1]}" for p in rows]
    shares = [100 * p.interaction_share for p in rows]
    line = 100 * threshold
    fig = go.Figure(go.Bar(
        x=names, y=shares, name="interaction share",
        marker=dict(color=["#E45756" if s >= line else "#4C78A8" for s in shares]),
        text=[f"{s:.1f}%" for s in shares], textposition="outside",
        customdata=[["yes" if p.joint_equals_greedy else "no"] for p in rows],
        hovertemplate="%{x}<br>interaction share %{y:.2f}%<br>joint = layer-by-layer: %{customdata[0]}"
                      "<extra></extra>",
    ))
    fig.add_hline(y=line, line=dict(color="#222", width=2, dash="dash"),
                  annotation_text=f"{line:.0f}%: the layers interact", annotation_position="top left")
    top = max([line, *shares])
    fig.update_layout(title=title, showlegend=False, xaxis_title="decoder layers (k, k+1)",
                      yaxis=dict(title="share of block-error variance not additive (%)", range=[0, 1.2 * top]),
                      **_LAYOUT)
    return fig


def partition_figure(
    entropies: Sequence[float],
    blocks: Sequence[Sequence[int]],
    h0: float | None = None,
    percentiles: Mapping[int, float | None] | None = None,
    title: str = "Block partition of the decoder layers",
) -> go.Figure:
    """Decoder layers coloured by block (top) and D(k,k+1) bars with the threshold h0 (bottom).

    A bar sits between layers k and k+1 and takes the colour of their common block when both
    are in one, grey otherwise, so one can see why the cut fell where it did: a block keeps
    adjacent layers whose dependency is above h0 (up to the maximum depth). Hovering a layer
    shows the activation percentile the search chose for it.
    """
    percentiles = {int(k): (None if v is None else float(v)) for k, v in (percentiles or {}).items()}

    def choice(k: int) -> str:  # None: the search kept the layer-wise init's ranges (its incumbent)
        if k in percentiles and percentiles[k] is None:
            return "the layer-wise init's (kept)"
        return "—" if k not in percentiles else f"percentile p = {percentiles[k]:.3f}"

    n_layers = max([len(entropies) + 1 if entropies else 0, *(max(b) + 1 for b in blocks if b)], default=0)
    if n_layers == 0:
        return empty_figure("Quantize a model with a Q-VLM recipe to see its block partition.", title)
    block_of = {layer: i for i, block in enumerate(blocks) for layer in block}
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.3, 0.7], vertical_spacing=0.08,
                        subplot_titles=("layers coloured by block", "conditional entropy D(k,k+1)"))
    for b, block in enumerate(blocks):
        layers = sorted(block)
        fig.add_trace(go.Bar(
            x=layers, y=[1] * len(layers), name=f"block {b}", width=0.92,
            marker=dict(color=_block_color(b)),
            text=[str(k) for k in layers], textposition="inside", insidetextanchor="middle",
            customdata=[[b, choice(k)] for k in layers],
            hovertemplate="layer %{x} · block %{customdata[0]}<br>activation ranges: %{customdata[1]}<extra></extra>",
        ), row=1, col=1)
    unassigned = [k for k in range(n_layers) if k not in block_of]
    if unassigned:
        fig.add_trace(go.Bar(
            x=unassigned, y=[1] * len(unassigned), name="not searched", width=0.92,
            marker=dict(color="#DDDDDD"),
            customdata=[[choice(k)] for k in unassigned],
            hovertemplate="layer %{x}<br>activation ranges: %{customdata[0]}<extra></extra>",
        ), row=1, col=1)
    if entropies:
        xs = [k + 0.5 for k in range(len(entropies))]
        colors = [
            _block_color(block_of[k]) if k in block_of and block_of.get(k + 1) == block_of[k] else "#BBBBBB"
            for k in range(len(entropies))
        ]
        fig.add_trace(go.Bar(
            x=xs, y=list(entropies), name="D(k,k+1)", marker=dict(color=colors), width=0.5, showlegend=False,
            customdata=[[k, k + 1] for k in range(len(entropies))],
            hovertemplate="D(%{customdata[0]},%{customdata[1]}) = %{y:.4g}<extra></extra>",
        ), row=2, col=1)
    if h0 is not None and finite(h0):
        fig.add_trace(go.Scatter(
            x=[-0.5, n_layers - 0.5], y=[h0, h0], mode="lines", name=f"h0 = {h0:.3g}",
            line=dict(color="#C00", width=2, dash="dash"), hovertemplate=f"threshold h0 = {h0:.4g}<extra></extra>",
        ), row=2, col=1)
        fig.add_annotation(text=f"h0 = {h0:.3g}", x=n_layers - 0.5, y=h0, xref="x2", yref="y2",
                           xanchor="right", yanchor="bottom", showarrow=False, font=dict(color="#C00"))
    fig.update_yaxes(visible=False, row=1, col=1)
    fig.update_yaxes(title_text="D(k,k+1)", row=2, col=1)
    fig.update_xaxes(title_text="decoder layer k", dtick=1, range=[-0.6, n_layers - 0.4], row=2, col=1)
    # The legend hangs below the x-axis title (yanchor "top"), in a bottom margin tall enough for two
    # rows of blocks (a 16-layer model), so the two never overlap.
    layout = {**_LAYOUT, "height": 500, "margin": dict(l=60, r=20, t=60, b=130)}
    fig.update_layout(title=f"{title} ({len(blocks)} blocks)", barmode="overlay", bargap=0.05,
                      legend=dict(orientation="h", yanchor="top", y=-0.22, x=0), **layout)
    return fig


def layer_error_figure(
    variants: Mapping[str, Sequence[LayerError]],
    tower: str | None = None,
    title: str = "Per-layer quantization error vs full precision",
) -> go.Figure:
    """Each layer's output error of the quantized model against the FP model, one trace per variant.

    The FP model is the reference (error 0), so the bars say how far each quantized layer
    drifts from it. When the rows carry ``fp_mse`` (the FP output's mean square) the error is
    shown relative to it, so vision and language layers of very different scales compare on
    one axis. ``init_mse`` (before the search, i.e. after the QLoRA-style init) is drawn as
    hollow markers when present, to show what the search bought. A log axis keeps 8-bit and
    3-bit variants readable together.
    """
    all_rows = [e for errors in variants.values() for e in errors]
    relative = bool(all_rows) and all(e.fp_mse > 0 for e in all_rows)

    def value(e: LayerError, key: str) -> float:
        return getattr(e, key) / e.fp_mse if relative else getattr(e, key)

    traces = []
    for v, (label, errors) in enumerate(variants.items()):
        rows = [e for e in errors if (tower is None or e.tower == tower) and finite(e.quant_mse)]
        if not rows:
            continue
        color = _block_color(v)
        traces.append(go.Bar(
            x=[_layer_name(e) for e in rows], y=[value(e, "quant_mse") for e in rows], name=f"{label} (final)",
            marker=dict(color=color), hovertemplate="%{x}<br>error %{y:.3g}<extra>" + label + "</extra>",
        ))
        init = [e for e in rows if finite(e.init_mse)]
        if init:
            traces.append(go.Scatter(
                x=[_layer_name(e) for e in init], y=[value(e, "init_mse") for e in init], mode="markers",
                name=f"{label} (after init, before VEO/search)",
                marker=dict(symbol="diamond-open", size=10, color=color, line=dict(width=2)),
                hovertemplate="%{x}<br>init error %{y:.3g}<extra>" + label + "</extra>",
            ))
    if not traces:
        return empty_figure("Quantize a model to see its per-layer error.", title)
    fig = go.Figure(traces)
    y_title = "output MSE / FP output power (log)" if relative else "output MSE vs FP (log)"
    fig.update_layout(title=title, barmode="group", yaxis=dict(title=y_title, **LOG_AXIS),
                      xaxis_title="layer (V = vision, L = language)", legend=dict(orientation="h", y=-0.3),
                      **{**_LAYOUT, "height": 420})
    return fig


def veo_loss_figure(losses: Sequence[VeoStep], title: str = "VEO loss (Eq. 10)",
                    holdout: Sequence[VeoEpoch] | None = None,
                    lambdas: tuple[float, float] | None = None, empty: str | None = None) -> go.Figure:
    """The visual-encoder optimization loss and its three terms per optimizer step, and the
    held-out Eq. 9 error per epoch (dashed, right axis) with the epoch VEO kept.

    L = L_reg + λ1·L_ent + λ2·L_err (Eq. 10). With ``lambdas`` = (λ1, λ2) the entropy and error terms
    are drawn weighted, so the three terms add up to the total drawn above them; without, unweighted.
    The held-out error, measured on train images VEO never saw, shows whether what it learned
    generalises; the title gives its change as :func:`qvlm.evaluation.analysis.veo_outcome` does for the text.
    ``empty``: the placeholder's message when there is no loss (why this variant has no VEO run).
    """
    rows = [r for r in losses if finite(r.total)]
    if not rows:
        return empty_figure(empty or "No VEO run in this variant (use the 'qvlm' or 'qvlm-veo' recipe).", title)
    steps = [r.step for r in rows]
    l1, l2 = lambdas if lambdas is not None else (1.0, 1.0)
    weighted = lambdas is not None
    terms = {"total": ("total L", 1.0), "reg": ("L_reg (answer CE)", 1.0),
             "ent": (f"λ1·L_ent (entropy, λ1 = {l1:g})" if weighted else "L_ent (entropy)", l1),
             "err": (f"λ2·L_err (output error, λ2 = {l2:g})" if weighted else "L_err (output error)", l2)}
    fig = go.Figure()
    values = []
    for key, (name, weight) in terms.items():
        ys = [getattr(r, key) * weight if finite(getattr(r, key)) else None for r in rows]
        if not any(finite(y) for y in ys):
            continue
        values += [y for y in ys if finite(y)]
        fig.add_trace(go.Scatter(
            x=steps, y=ys, mode="lines+markers" if len(rows) < 40 else "lines", name=name,
            line=dict(width=3 if key == "total" else 1.5), customdata=[r.epoch for r in rows],
            hovertemplate="step %{x} (epoch %{customdata})<br>%{y:.4g}<extra>" + name + "</extra>",
        ))
    positive = [v for v in values if v > 0]
    log_axis = bool(positive) and len(positive) == len(values) and max(values) / min(values) > 100
    held = [h for h in (holdout or []) if finite(h.err)]
    outcome = veo_outcome(held)
    if outcome is not None:
        per_epoch = max(1, len(rows) // max(1, max(r.epoch for r in rows)))
        fig.add_trace(go.Scatter(
            x=[h.epoch * per_epoch for h in held], y=[h.err for h in held], yaxis="y2",
            mode="lines+markers", name="held-out L_err (unseen images)", line=dict(dash="dash", width=2.5),
            marker=dict(size=[12 if h.kept else 6 for h in held]),
            customdata=[h.epoch for h in held],
            hovertemplate="after epoch %{customdata}<br>held-out error %{y:.4g}<extra></extra>",
        ))
        title = f"{title}: held-out error {outcome.error_phrase}, epoch {outcome.kept_epoch} kept"
        fig.update_layout(yaxis2=dict(title="held-out error", overlaying="y", side="right", showgrid=False))
    y_axis = dict(title="loss (log)", **LOG_AXIS) if log_axis else dict(title="loss", type="linear")
    fig.update_layout(title=title, xaxis_title="optimizer step", yaxis=y_axis, legend=dict(orientation="h", y=-0.25),
                      **_LAYOUT)
    return fig


def accuracy_figure(scores: Mapping[str, EvalResult], title: str = "easy-VQA accuracy",
                    fp_label: str = "FP") -> go.Figure:
    """Grouped bars: overall and per-question-type accuracy, one group per model (label -> its evaluation).

    The model labelled ``fp_label`` is drawn in FP's grey.
    """
    if not scores:
        return empty_figure("Run an evaluation to compare accuracies.", title)
    categories = ["overall", *sorted({t for r in scores.values() for t in r.per_type})]
    fig = go.Figure()
    for i, (label, r) in enumerate(scores.items()):
        values = [r.accuracy, *(r.per_type.get(c) for c in categories[1:])]
        fig.add_trace(go.Bar(
            x=categories, y=[100 * v if v is not None else None for v in values], name=label,
            marker=dict(color=FP_COLOR if label == fp_label else _block_color(i)),
            text=[f"{100 * v:.1f}" if v is not None else "" for v in values], textposition="outside",
            hovertemplate="%{x}: %{y:.1f}%<extra>" + label + "</extra>",
        ))
    fig.update_layout(title=title, barmode="group", yaxis=dict(title="accuracy (%)", range=[0, 112]),
                      legend=dict(orientation="h", y=-0.2), **_LAYOUT)
    return fig


def memory_figure(memory: Mapping[str, WeightMemory], title: str = "Weight memory") -> go.Figure:
    """FP16 bytes vs quantized (packed) bytes of the weights, per model (label -> its weight memory), in MiB."""
    if not memory:
        return empty_figure("Quantize a model to compare weight memory.", title)
    labels, rows = list(memory), list(memory.values())
    fig = go.Figure([
        go.Bar(x=labels, y=[r.fp16_bytes / 2**20 for r in rows], name="FP16", marker=dict(color="#BBBBBB"),
               hovertemplate="%{x}<br>FP16: %{y:.2f} MiB<extra></extra>"),
        go.Bar(x=labels, y=[r.quant_bytes / 2**20 for r in rows], name="quantized (packed)",
               marker=dict(color="#4C78A8"), text=[_ratio(r) for r in rows], textposition="outside",
               hovertemplate="%{x}<br>quantized: %{y:.2f} MiB<extra></extra>"),
    ])
    fig.update_layout(title=title, barmode="group", yaxis_title="MiB", legend=dict(orientation="h", y=-0.2),
                      **_LAYOUT)
    return fig


def _ratio(memory: WeightMemory) -> str:
    return f"{memory.fp16_bytes / memory.quant_bytes:.2f}x smaller" if memory.quant_bytes else ""


def _block_color(i: int) -> str:
    return BLOCK_COLORS[i % len(BLOCK_COLORS)]


def _layer_name(e: LayerError) -> str:
    return f"{'V' if e.tower == 'vision' else 'L' if e.tower == 'language' else e.tower}{e.index}"


def token_kl_figure(comparison: TokenComparison | None, title: str = "KL(FP‖variant) per answer token") -> go.Figure:
    """Grouped bars of KL(FP‖variant) per step of FP's answer, one colour per variant; a variant's first
    step with another top token is marked with a red ring.

    ``comparison``: what :func:`qvlm.evaluation.compare.token_comparison` returns.
    """
    if comparison is None or not comparison.variants or not comparison.tokens:
        return empty_figure("Quantize a model and ask a question to compare token by token.", title)
    steps = [f"{j}: {html.escape(t)}" for j, t in enumerate(comparison.tokens)]  # plotly reads "</s>" as a tag
    fig = go.Figure()
    for i, (label, v) in enumerate(comparison.variants.items()):
        kl, first = list(v.kl), v.first_diff
        fig.add_trace(go.Bar(
            x=steps, y=kl, name=label, marker=dict(color=_block_color(i),
                                                   line=dict(color=["#E45756" if j == first else "white"
                                                                    for j in range(len(kl))], width=3)),
            hovertemplate="%{x}<br>KL: %{y:.3g} nats<extra>" + label + "</extra>",
        ))
    fig.update_layout(title=title, barmode="group", xaxis_title="step: FP's token", yaxis_title="KL (nats)",
                      legend=dict(orientation="h", y=-0.3), **_LAYOUT)
    return fig


def bit_sweep_figure(rows: Sequence[SweepPoint], title: str = "easy-VQA accuracy vs bit-width") -> go.Figure:
    """One line per recipe over the bit settings (most bits left), FP as a dashed horizontal line.

    ``rows``: what :func:`qvlm.evaluation.compare.bit_sweep` returns (the FP row has ``recipe == "fp"``).
    """
    points = [r for r in rows if r.recipe != "fp"]
    if not points:
        return empty_figure("Run the sweep to see accuracy fall with the bit-width.", title)
    order = sorted({r.bits for r in points}, key=_bits_key, reverse=True)
    fig = go.Figure()
    for i, recipe in enumerate(dict.fromkeys(r.recipe for r in points)):
        mine = {r.bits: r for r in points if r.recipe == recipe}
        xs = [b for b in order if b in mine]
        fig.add_trace(go.Scatter(
            x=xs, y=[100 * mine[b].accuracy for b in xs], mode="lines+markers", name=recipe,
            line=dict(color=_block_color(i), width=2), marker=dict(size=9),
            hovertemplate="%{x}: %{y:.1f}%<extra>" + recipe + "</extra>",
        ))
    fp = next((r for r in rows if r.recipe == "fp"), None)
    if fp is not None:
        fig.add_hline(y=100 * fp.accuracy, line=dict(color=FP_COLOR, dash="dash"),
                      annotation_text=f"FP {100 * fp.accuracy:.1f}%", annotation_position="bottom left")
    n = points[0].n
    shown = [100 * r.accuracy for r in rows if finite(r.accuracy)]
    fig.update_layout(title=f"{title} ({n} test questions)" if n else title, xaxis_title="bit setting",
                      yaxis=dict(title="accuracy (%)", range=accuracy_range(shown)),
                      legend=dict(orientation="h", y=-0.25), **_LAYOUT)
    return fig


def accuracy_range(values: Sequence[float]) -> list[float]:
    """A y range (%) that shows the differences: from a little below the lowest value to just above 100.

    Why not 0-100: at 97-100% every line would sit on the top edge. The floor is a multiple of 5,
    at least 2 points below the lowest value, and never below 0.
    """
    if not values:
        return [0.0, 101.0]
    lo, hi = min(values), max(values)
    pad = max(2.0, 0.1 * (hi - lo))
    return [max(0.0, 5 * math.floor((lo - pad) / 5)), min(100.0, hi) + 1.0]


def paper_table_figure(table: Mapping[str, Mapping[str, Mapping[str, float]]], source: str,
                       title: str = "The paper's LLaVA-1.5-7B numbers") -> go.Figure:
    """One panel per dataset: accuracy per bit setting, one line per method, FP dashed; the source in the title.

    ``table``: dataset -> bit setting -> method -> accuracy (%), e.g.
    :data:`qvlm.evaluation.compare.PAPER_TABLE3_LLAVA15_7B`; bit settings in the table's own order.
    """
    if not table:
        return empty_figure("No paper numbers to show.", title)
    datasets = list(table)
    fig = make_subplots(rows=1, cols=len(datasets), subplot_titles=datasets)
    methods = list(dict.fromkeys(m for d in table.values() for b, ms in d.items() if b != "FP" for m in ms))
    for col, name in enumerate(datasets, start=1):
        settings = [b for b in table[name] if b != "FP"]
        for i, method in enumerate(methods):
            xs = [b for b in settings if method in table[name][b]]
            fig.add_trace(go.Scatter(
                x=xs, y=[table[name][b][method] for b in xs], mode="lines+markers", name=method,
                legendgroup=method, showlegend=col == 1, line=dict(color=_block_color(i)),
                hovertemplate=f"{name} %{{x}}: %{{y:.2f}}%<extra>{method}</extra>",
            ), row=1, col=col)
        fp = table[name].get("FP", {}).get("FP")
        if fp is not None:
            fig.add_hline(y=fp, line=dict(color=FP_COLOR, dash="dash"), row=1, col=col,
                          annotation_text=f"FP {fp:.2f}", annotation_position="bottom left")
    fig.update_layout(title=f"{title} ({source})", legend=dict(orientation="h", y=-0.25),
                      **{**_LAYOUT, "margin": dict(l=60, r=20, t=90, b=50)})
    fig.update_yaxes(title_text="accuracy (%)", row=1, col=1)
    return fig


def modality_figure(rows: Sequence[ModalityRow], title: str = "Decoder-layer input: image vs text tokens") -> go.Figure:
    """Per decoder layer, |x| of image tokens and of text tokens: the percentile solid, the maximum dotted.

    ``rows``: what :func:`qvlm.evaluation.modality.modality_activation_stats` returns.
    """
    if not rows:
        return empty_figure("Press 'Measure image vs text tokens' to see both modalities' ranges.", title)
    layers = [f"L{r.layer}" for r in rows]
    pct = rows[0].percentile
    fig = go.Figure()
    for modality, color in (("image", "#F58518"), ("text", "#4C78A8")):
        fig.add_trace(go.Scatter(x=layers, y=[getattr(r, modality).p for r in rows], mode="lines+markers",
                                 name=f"{modality} tokens, {pct:g}th pct |x|", line=dict(color=color, width=2),
                                 hovertemplate="%{x}: %{y:.3g}<extra>" + modality + f" {pct:g}th pct</extra>"))
        fig.add_trace(go.Scatter(x=layers, y=[getattr(r, modality).max for r in rows], mode="lines+markers",
                                 name=f"{modality} tokens, max |x|", line=dict(color=color, dash="dot"),
                                 marker=dict(symbol="triangle-up"),
                                 hovertemplate="%{x}: %{y:.3g}<extra>" + modality + " max</extra>"))
    fig.update_layout(title=title, xaxis_title="decoder layer (its input)", yaxis=dict(title="|x|", **LOG_AXIS),
                      legend=dict(orientation="h", y=-0.25), **_LAYOUT)
    return fig


def vision_sites_figure(rows: Sequence[SiteError], all_on: float | None = None,
                        title: str = "Where the vision tower loses") -> go.Figure:
    """Per vision layer and site, the image-token error its activation quantizers add alone (bars, one colour per site).

    ``rows``: as :func:`qvlm.evaluation.vision_sites.vision_site_errors` returns them; ``all_on``: the error with
    every vision site on, written in the title.
    """
    if not rows:
        return empty_figure("Press 'Measure the vision sites' to see which activations cost the most.", title)
    fig = go.Figure()
    for i, site in enumerate(SITE_NAMES):
        mine = [r for r in rows if r.site == site]
        if mine:
            fig.add_trace(go.Bar(
                x=[f"V{r.layer}" for r in mine], y=[100 * r.error for r in mine], name=SITE_NAMES[site],
                marker_color=BLOCK_COLORS[i], customdata=[100 * r.share for r in mine],
                text=[vision_site_name(r) for r in mine],
                hovertemplate="%{text}: %{y:.3g}% of the FP output power (%{customdata:.0f}% of the sum)<extra></extra>"))
    if finite(all_on):
        title += f" (every vision site on: {100 * float(all_on):.3g}%)"
    fig.update_layout(title=title, barmode="group", xaxis_title="vision layer",
                      yaxis_title="added image-token error (% of FP power)", legend=dict(orientation="h", y=-0.25),
                      **_LAYOUT)
    return fig


def site_map_figure(m: SiteMap | None, title: str = "|x| at a vision site, token x channel") -> go.Figure:
    """Heatmap of |x| (tokens down, channels across) with each token's and each channel's static range beside it.

    ``m`` as :func:`qvlm.evaluation.vision_sites.site_activation_map` returns it. Why both ranges: a
    per-token range must span that token's largest channel, a per-channel range only that channel.
    """
    if m is None or not m.abs:
        return empty_figure("Pick a vision layer and site to see its activations.", title)
    fig = make_subplots(rows=2, cols=2, column_widths=[0.85, 0.15], row_heights=[0.2, 0.8],
                        shared_xaxes="columns", shared_yaxes="rows", horizontal_spacing=0.02, vertical_spacing=0.03)
    tokens = list(range(len(m.abs)))
    channels = list(range(len(m.abs[0])))
    fig.add_trace(go.Heatmap(z=m.abs, x=channels, y=tokens, colorscale="Viridis", colorbar=dict(title="|x|"),
                             hovertemplate="token %{y}, channel %{x}: |x| = %{z:.3g}<extra></extra>"), row=2, col=1)
    fig.add_trace(go.Bar(x=channels, y=m.channel_range, name="per-channel range", marker_color="#F58518",
                         hovertemplate="channel %{x}: range %{y:.3g}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Bar(y=tokens, x=m.token_range, orientation="h", name="per-token range",
                         marker_color="#4C78A8", hovertemplate="token %{y}: range %{x:.3g}<extra></extra>"),
                  row=2, col=2)
    name = f"V{m.layer} {SITE_NAMES.get(m.site, m.site)}"
    fig.update_layout(title=f"{name}: |x| of one image, with per-token and per-channel ranges",
                      showlegend=False, **{**_LAYOUT, "height": 480})
    fig.update_xaxes(title_text="channel", row=2, col=1)
    fig.update_yaxes(title_text="token", autorange="reversed", row=2, col=1)
    fig.update_yaxes(autorange="reversed", row=2, col=2)
    return fig


def _bits_key(label: str) -> tuple[int, int]:
    """"W4A3" -> (4, 3), for ordering bit settings; unknown labels sort first."""
    digits = [int(d) for d in re.findall(r"\d+", label)]
    return (digits + [0, 0])[0], (digits + [0, 0])[1]


def table4_figure(result: Table4Result, title: str = "Table 4 on this machine: one layer's Linears") -> go.Figure:
    """Latency (ms) and weight memory (MiB) per storage format, one bar group per layer, ratios vs FP32 on the bars.

    ``result``: what ``benchmarks/table4.py`` wrote, read by :func:`qvlm.evaluation.table4.read_table4` (rows that
    did not run are left out there).
    """
    rows = result.rows
    if not rows:
        return empty_figure("The measured Table 4 holds no row.", title)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("latency (ms, lower is faster)", "weight memory (MiB)"))
    for i, layer in enumerate(dict.fromkeys(r.group for r in rows)):
        mine = [r for r in rows if r.group == layer]
        formats = [r.format for r in mine]
        color = _block_color(i)
        fig.add_trace(go.Bar(x=formats, y=[1e3 * r.seconds for r in mine], name=layer, marker_color=color,
                             legendgroup=layer, text=[f"{r.speedup_vs_fp32:.2f}x" for r in mine],
                             textposition="outside", hovertemplate="%{x}: %{y:.2f} ms (%{text} vs FP32)<extra>"
                             + layer + "</extra>"), row=1, col=1)
        fig.add_trace(go.Bar(x=formats, y=[r.weight_bytes / 2**20 for r in mine], name=layer, marker_color=color,
                             legendgroup=layer, showlegend=False,
                             text=[f"{r.memory_saving_vs_fp32:.1f}x smaller" for r in mine], textposition="outside",
                             hovertemplate="%{x}: %{y:.1f} MiB (%{text} than FP32)<extra>" + layer + "</extra>"),
                      row=1, col=2)
    fig.update_layout(title=title, barmode="group", legend=dict(orientation="h", y=-0.35),
                      **{**_LAYOUT, "height": 440})
    return fig
