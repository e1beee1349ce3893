"""qvlm.ui.plots: every figure builds from plain data, shows what the paper's figures show, and
degrades to a readable placeholder on empty input (the app draws them before any run)."""

from __future__ import annotations

from types import SimpleNamespace

import plotly.graph_objects as go
import pytest

from qvlm.evaluation.compare import SweepPoint
from qvlm.quant.memory import WeightBytes, WeightMemory
from qvlm.ui import plots
from qvlm.utils.stats import LinearFit
from qvlm.evaluation.vision_sites import SiteError, SiteMap
from tests.run_records import ded_point, layer_error, modality_row, pair, token_comparison, veo_epoch, veo_step


def _texts(fig: go.Figure) -> str:
    return " ".join(a.text or "" for a in fig.layout.annotations) + " " + str(fig.layout.title.text)


def test_ded_scatter_has_points_fit_line_and_r2_annotation():
    points = [ded_point(e, 0.5 * e + 0.1, e * e, i) for i, e in enumerate([0.1, 0.4, 0.9, 1.3])]
    fig = plots.ded_scatter(points, layer=3)
    scatter, line = fig.data
    assert len(scatter.x) == 4 and scatter.mode == "markers"
    assert line.mode == "lines"
    assert "R² = 1.0000" in _texts(fig)
    assert "layer 3" in _texts(fig)
    # the quantization-error variant uses the qerr key and the supplied fit
    fig2 = plots.ded_scatter(points, layer=3, x_key="qerr", fit=LinearFit(1.0, 0.0, 0.81))
    assert "R² = 0.8100" in _texts(fig2)
    assert list(fig2.data[0].x) == [p.qerr for p in points]


def test_ded_scatter_writes_the_r2_chance_level_beside_r2():
    points = [ded_point(e, 0.5 * e + 0.1) for e in (0.1, 0.4, 0.9, 1.3)]
    fig = plots.ded_scatter(points, layer=3, fit=LinearFit(0.5, 0.1, 0.03), r2_chance=0.0625)
    assert "R² = 0.0300 (chance level 0.06 for n = 4)" in _texts(fig)
    assert "chance level" not in _texts(plots.ded_scatter(points, layer=3))


def test_interaction_figure_bars_each_pair_with_a_dashed_threshold_line():
    pairs = [pair(0, 0.02), pair(1, 0.25, joint_equals_greedy=False), pair(2, None)]
    fig = plots.interaction_figure(pairs, threshold=0.10)
    (bars,) = fig.data
    assert list(bars.x) == ["L0–L1", "L1–L2"] and list(bars.y) == pytest.approx([2.0, 25.0])
    assert bars.marker.color[0] != bars.marker.color[1]  # above the line stands out
    (line,) = fig.layout.shapes
    assert line.y0 == line.y1 == pytest.approx(10.0) and line.line.dash == "dash"
    assert "10%" in _texts(fig)
    assert "Do the layers interact?" in _texts(plots.interaction_figure([]))


def test_ded_scatter_explains_an_all_zero_ded():
    fig = plots.ded_scatter([ded_point(e, 0.0, e) for e in (1.0, 1.5, 2.0)], layer=4)
    assert "chose the same ranges" in _texts(fig)


def test_ded_scatter_skips_non_finite_points_and_handles_empty():
    fig = plots.ded_scatter([ded_point(float("nan"), 1.0)], layer=0)
    assert len(fig.data) == 0 and "No DED samples" in _texts(fig)


def test_partition_figure_colours_layers_by_block_and_draws_h0():
    entropies = [0.9, 0.2, 0.8, 0.7, 0.1]  # 6 layers
    blocks = [[0, 1], [2, 3, 4], [5]]
    pct = {0: 1.0, 1: 0.995, 2: 0.99, 3: 0.98, 4: 1.0, 5: 0.985}
    fig = plots.partition_figure(entropies, blocks, h0=0.5, percentiles=pct)
    block_traces = [t for t in fig.data if t.name and t.name.startswith("block")]
    assert [list(t.x) for t in block_traces] == blocks
    assert len({t.marker.color for t in block_traces}) == 3
    # chosen percentile reaches the hover data
    assert block_traces[1].customdata[1][1] == "percentile p = 0.980"
    d_bars = next(t for t in fig.data if t.name == "D(k,k+1)")
    assert list(d_bars.y) == entropies and list(d_bars.x) == [0.5, 1.5, 2.5, 3.5, 4.5]
    # a bar inside a block takes the block's colour, a bar across a cut is grey
    assert d_bars.marker.color[0] == block_traces[0].marker.color
    assert d_bars.marker.color[1] == "#BBBBBB"
    h0_line = next(t for t in fig.data if t.name and t.name.startswith("h0"))
    assert set(h0_line.y) == {0.5}
    assert "3 blocks" in _texts(fig)


def test_partition_figure_empty_is_a_placeholder():
    fig = plots.partition_figure([], [])
    assert "Quantize a model" in _texts(fig)


def test_layer_error_figure_groups_variants_and_shows_init():
    errs = [layer_error("vision", 0, 1e-3, 2e-3), layer_error("language", 0, 5e-4)]
    fig = plots.layer_error_figure({"W4A4 qvlm": errs, "W8A8 rtn": [layer_error("language", 0, 1e-5)]})
    names = [t.name for t in fig.data]
    assert "W4A4 qvlm (final)" in names and "W4A4 qvlm (after init, before VEO/search)" in names
    assert "W8A8 rtn (final)" in names
    assert list(fig.data[0].x) == ["V0", "L0"]
    assert fig.layout.yaxis.type == "log"
    assert "Quantize a model" in _texts(plots.layer_error_figure({}))


def test_layer_error_figure_is_relative_when_fp_power_is_known():
    errs = [layer_error("language", 0, 0.02, 0.04, fp_mse=2.0)]
    fig = plots.layer_error_figure({"v": errs})
    assert fig.data[0].y[0] == pytest.approx(0.01) and fig.data[1].y[0] == pytest.approx(0.02)
    assert "FP output power" in fig.layout.yaxis.title.text


def test_veo_loss_figure_plots_each_term():
    losses = [veo_step(i, i // 2, 3 - 0.1 * i, 1.0, 0.5, 1.5 - 0.1 * i) for i in range(6)]
    fig = plots.veo_loss_figure(losses)
    assert [t.name for t in fig.data] == ["total L", "L_reg (answer CE)", "L_ent (entropy)", "L_err (output error)"]
    assert "No VEO run" in _texts(plots.veo_loss_figure([]))
    tiny_err = [veo_step(1, 1, 1.6, 1.6, 2.1, 7e-4)]
    assert plots.veo_loss_figure(tiny_err).layout.yaxis.type == "log"  # a 1e-3 term stays visible


def test_accuracy_and_memory_figures():
    scores = {"FP": SimpleNamespace(accuracy=0.9, per_type={"yes/no": 0.95, "shape": 0.8}),
              "W4A4 qvlm": SimpleNamespace(accuracy=0.85, per_type={"yes/no": 0.9, "shape": 0.7})}
    fig = plots.accuracy_figure(scores)
    assert list(fig.data[0].x) == ["overall", "shape", "yes/no"]
    assert fig.data[0].y[0] == pytest.approx(90.0)
    mem = plots.memory_figure({"W4A4 qvlm": WeightMemory({"language": WeightBytes(4 * 2**20, 8 * 2**20, 2 * 2**20)})})
    assert mem.data[0].y[0] == pytest.approx(8.0) and mem.data[1].y[0] == pytest.approx(2.0)
    assert mem.data[1].text[0] == "4.00x smaller"
    assert "Run an evaluation" in _texts(plots.accuracy_figure({}))


def test_plots_module_does_not_import_gradio():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(plots))
    imported = {n.names[0].name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)}
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "gradio" not in imported


def test_token_kl_figure_bars_each_variant_per_step_and_rings_the_first_difference():
    comparison = token_comparison(["circle", "</s>"], {"W4A4 qvlm": ([0.01, 0.0], None), "W3A3 rtn": ([2.5, 0.1], 0)})
    fig = plots.token_kl_figure(comparison)
    assert [t.name for t in fig.data] == ["W4A4 qvlm", "W3A3 rtn"]
    assert list(fig.data[0].x) == ["0: circle", "1: &lt;/s&gt;"] and list(fig.data[1].y) == [2.5, 0.1]
    assert list(fig.data[1].marker.line.color) == ["#E45756", "white"]
    assert "compare token by token" in _texts(plots.token_kl_figure(None))


def test_bit_sweep_figure_orders_bits_from_most_and_draws_fp_as_a_line():
    rows = [SweepPoint("fp", "FP", 0.9, 200, 0),
            SweepPoint("qvlm", "W4A3", 0.5, 200, 0),
            SweepPoint("qvlm", "W8A8", 0.9, 200, 0),
            SweepPoint("rtn", "W4A4", 0.6, 200, 0)]
    fig = plots.bit_sweep_figure(rows)
    qvlm, rtn = fig.data
    assert list(qvlm.x) == ["W8A8", "W4A3"] and list(qvlm.y) == [90.0, 50.0] and list(rtn.x) == ["W4A4"]
    assert "FP 90.0%" in _texts(fig) and "200 test questions" in _texts(fig)
    assert "Run the sweep" in _texts(plots.bit_sweep_figure(rows[:1]))


def test_paper_table_figure_has_one_panel_per_dataset_and_names_its_source():
    table = {"SQA": {"FP": {"FP": 66.79}, "W6A6": {"AWQ": 65.87, "Q-VLM": 66.67}, "W4A4": {"AWQ": 56.73, "Q-VLM": 57.70}},
             "VizWiz": {"FP": {"FP": 49.87}, "W6A6": {"AWQ": 48.51, "Q-VLM": 49.86}, "W4A4": {"AWQ": 44.29, "Q-VLM": 45.82}}}
    fig = plots.paper_table_figure(table, "Wang et al., Q-VLM, NeurIPS 2024, Table 3")
    assert "Table 3" in fig.layout.title.text and "SQA" in _texts(fig) and "VizWiz" in _texts(fig)
    assert len(fig.data) == 4 and list(fig.data[1].y) == [66.67, 57.70]
    assert "FP 49.87" in _texts(fig)


def test_modality_figure_draws_percentile_and_max_for_both_modalities_on_a_log_axis():
    rows = [modality_row(k, 1.0 + k, 0.5, 2.0 + k, 3.0)
            for k in range(3)]
    fig = plots.modality_figure(rows)
    assert [t.name for t in fig.data] == ["image tokens, 99.9th pct |x|", "image tokens, max |x|",
                                          "text tokens, 99.9th pct |x|", "text tokens, max |x|"]
    assert list(fig.data[0].x) == ["L0", "L1", "L2"] and fig.layout.yaxis.type == "log"
    assert "Measure image vs text" in _texts(plots.modality_figure([]))


def test_veo_figure_shows_the_held_out_error_and_the_kept_epoch():
    losses = [veo_step(i + 1, i // 2 + 1, 1.0 - 0.1 * i, 0.5, 0.1, 0.4) for i in range(4)]
    holdout = [veo_epoch(0, 0.05), veo_epoch(1, 0.04, kept=True), veo_epoch(2, 0.045)]
    fig = plots.veo_loss_figure(losses, holdout=holdout)
    held = [t for t in fig.data if "held-out" in t.name]
    assert len(held) == 1 and list(held[0].y) == [0.05, 0.04, 0.045] and list(held[0].x) == [0, 2, 4]
    assert "0.05 → 0.04 (-20%), epoch 1 kept" in fig.layout.title.text
    assert "held-out" not in plots.veo_loss_figure(losses).layout.title.text


def test_veo_terms_are_drawn_weighted_so_they_add_up_to_the_total():
    """Eq. 10: L = L_reg + λ1·L_ent + λ2·L_err; an unweighted L_ent above the total misreads the figure."""
    losses = [veo_step(i, 1, 0.5 + 0.01 * (3.0 - 0.1 * i) + 1.0 * 0.2, 0.5, 3.0 - 0.1 * i, 0.2) for i in range(4)]
    fig = plots.veo_loss_figure(losses, lambdas=(0.01, 1.0))
    by_name = {t.name.split(" (")[0]: list(t.y) for t in fig.data}
    assert set(by_name) == {"total L", "L_reg", "λ1·L_ent", "λ2·L_err"}
    for i, total in enumerate(by_name["total L"]):
        assert total == pytest.approx(by_name["L_reg"][i] + by_name["λ1·L_ent"][i] + by_name["λ2·L_err"][i])
        assert total >= by_name["λ1·L_ent"][i]  # the total is never drawn below one of its terms


def test_veo_placeholder_says_why_there_is_no_run():
    fig = plots.veo_loss_figure([], empty="No VEO in this variant: its vision tower stays in full precision.")
    assert "vision tower stays in full precision" in _texts(fig) and "use the 'qvlm'" not in _texts(fig)


def test_token_labels_are_escaped_so_the_end_token_shows():
    fig = plots.token_kl_figure(token_comparison(["circle", "</s>"], {"v": ([0.1, 0.0], None)}))
    assert list(fig.data[0].x) == ["0: circle", "1: &lt;/s&gt;"]


def test_bit_sweep_axis_shows_differences_near_100_percent():
    rows = [SweepPoint("fp", "FP", 0.995, 200, 0),
            SweepPoint("qvlm", "W8A8", 0.99, 200, 0),
            SweepPoint("qvlm", "W4A4", 0.97, 200, 0)]
    low, high = plots.bit_sweep_figure(rows).layout.yaxis.range
    assert 85 <= low <= 95 and 100 <= high <= 102
    assert plots.accuracy_range([3.0, 99.0])[0] == 0.0  # never below 0


def test_log_axes_tick_once_per_power_of_ten():
    rows = [modality_row(k, 10.0 ** k, 1.0, 2 * 10.0 ** k, 3.0)
            for k in range(3)]
    axis = plots.modality_figure(rows).layout.yaxis
    assert axis.type == "log" and axis.dtick == 1
    errs = [layer_error("language", 0, 1e-4)]
    assert plots.layer_error_figure({"v": errs}).layout.yaxis.dtick == 1


def test_partition_legend_hangs_below_the_axis_title():
    blocks = [[2 * i, 2 * i + 1] for i in range(8)]  # 16 layers, as the mosaic model
    fig = plots.partition_figure([0.5] * 15, blocks, h0=0.4)
    legend = fig.layout.legend
    assert legend.yanchor == "top" and legend.y <= -0.2 and fig.layout.margin.b >= 120


def test_vision_sites_figure_has_one_bar_series_per_site_and_names_the_total():
    from qvlm.ui.plots import site_map_figure, vision_sites_figure

    rows = [SiteError(l, s, 0.001 * (l + 1), 0.125) for l in range(2)
            for s in ("qkv", "out_proj", "fc1", "fc2")]
    fig = vision_sites_figure(rows, all_on=0.02)
    assert [t.name for t in fig.data] == ["q/k/v input", "out_proj input", "fc1 input", "fc2 input"]
    assert list(fig.data[3].x) == ["V0", "V1"] and list(fig.data[3].y) == pytest.approx([0.1, 0.2])
    assert "every vision site on: 2%" in fig.layout.title.text
    assert "Measure the vision sites" in vision_sites_figure([]).layout.annotations[0].text
    m = SiteMap(layer=1, site="fc2", bits=4, samples=2, abs=[[1.0, 9.0], [2.0, 8.0], [0.5, 7.0]],
                token_range=[10.0, 10.0, 8.0], channel_range=[3.0, 18.0], levels_token=0.3, levels_channel=1.5)
    heat = site_map_figure(m)
    assert [type(t).__name__ for t in heat.data] == ["Heatmap", "Bar", "Bar"] and "V1 fc2 input" in heat.layout.title.text
    assert site_map_figure(None).layout.annotations
