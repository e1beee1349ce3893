"""The Analysis tab's words: each view opens with one plain sentence made from its numbers, a figure and
the text under it read one helper (so they cannot disagree), and the costs it announces are measured ones.
Plain data only: no model is loaded.
"""

from __future__ import annotations

import re
from dataclasses import replace
from types import SimpleNamespace

import gradio as gr
import pytest

from qvlm.quant import QuantConfig
from qvlm.evaluation.analysis import veo_outcome
from qvlm.ui import explain, plots
from qvlm.ui.panel_analysis import INTERACTION_COLUMNS, AnalysisPanel, no_veo_reason, rerun_cost
from qvlm.utils.stats import LinearFit
from qvlm.evaluation.vision_sites import SiteError, SiteMap
from tests.run_records import ded_point, layer_error, modality_row, pair, search_row, veo_epoch, veo_step

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# The easy-VQA case found by a user: the held-out error fell 33%, but the answers moved away from FP.
EASY_VQA_HOLDOUT = [veo_epoch(0, 0.0953, answer_kl=0.010, ceiling_kl=0.004), veo_epoch(1, 0.0700, answer_kl=0.011),
                    veo_epoch(2, 0.0638, kept=True, answer_kl=0.012)]
LOSSES = [veo_step(i + 1, i // 2 + 1, 1.0, 0.5, 10.0, 0.4) for i in range(4)]


def _percent(text: str) -> list[str]:
    return re.findall(r"[+-−]?\d+%", text)


def test_the_veo_title_and_the_text_under_it_give_the_same_numbers():
    outcome = veo_outcome(EASY_VQA_HOLDOUT)
    title = plots.veo_loss_figure(LOSSES, holdout=EASY_VQA_HOLDOUT).layout.title.text
    text = explain.veo_sentence(outcome)
    assert outcome.error_phrase == "0.0953 → 0.0638 (-33%)"
    assert outcome.error_phrase in title and outcome.error_phrase in text
    assert "-33%" in _percent(title) and "-33%" in _percent(text)
    # both facts are told, as one story: the error fell, the answers moved away; no "removed 0%"
    assert "fell" in text and "further from" in text and "removed 0%" not in text
    assert "larger" in text and text.startswith("VEO:") and "KL(FP" in text and "unquantized" in text
    lead = explain.veo_lead(outcome)
    assert "fell by 33%" in lead and "but the answers moved further from" in lead


def test_veo_that_kept_the_init_says_so_in_title_and_text():
    holdout = [replace(EASY_VQA_HOLDOUT[0], kept=True), veo_epoch(1, 0.1, answer_kl=0.011)]
    outcome = veo_outcome(holdout)
    assert outcome.kept_epoch == 0 and outcome.error_phrase == "0.0953 → 0.0953 (+0%)"
    assert "epoch 0 kept" in plots.veo_loss_figure(LOSSES, holdout=holdout).layout.title.text
    assert "kept the layer-wise ranges (epoch 0 of 1)" in explain.veo_sentence(outcome)
    assert veo_outcome([]) is None and "no held-out images" in explain.veo_sentence(None)


def test_a_variant_without_veo_is_told_why():
    vision_fp = no_veo_reason(QuantConfig(recipe="qvlm", quantize_vision=False))
    assert "vision tower stays in full precision" in vision_fp and "use the" not in vision_fp
    assert "'rtn' recipe has no VEO step" in no_veo_reason(QuantConfig(recipe="rtn"))
    assert "0 VEO epochs" in no_veo_reason(QuantConfig(recipe="qvlm", veo_epochs=0))


def test_the_cost_of_a_ded_run_quotes_the_measured_init_time_and_no_guess():
    variant = SimpleNamespace(result=SimpleNamespace(config=QuantConfig(calib_size=16), timings={"init": 74.4}))
    text = rerun_cost(variant, 8)
    assert "74.4 s on 16 calibration pairs" in text and "8 samples" in text and "minutes" not in text
    untimed = SimpleNamespace(result=SimpleNamespace(config=QuantConfig(), timings={}))
    assert " s " not in rerun_cost(untimed, 8)


def test_interaction_lead_says_in_words_whether_the_errors_add_up():
    additive = [pair(k, 0.01 * k) for k in range(4)]
    lead = explain.interaction_lead(additive)
    assert "add up" in lead and "cannot help" in lead and "L3–L4" in lead
    coupled = [additive[0], replace(additive[1], interaction_share=0.4, joint_equals_greedy=False)]
    lead = explain.interaction_lead(coupled)
    assert lead.startswith("1 of 2 neighbouring layer pairs interact") and "L1–L2" in lead and "40.0%" in lead


def test_ded_lead_reads_r2_against_chance_in_plain_words():
    points = [ded_point(0.1 * i, 0.01 * (i % 3)) for i in range(16)]
    below = explain.ded_lead(points, 0.069, 0.25)
    assert "0.0690" in below and "0.25" in below and "no better than a guess" in below
    above = explain.ded_lead(points, 0.62, 0.25)
    assert "0.6200" in above and "above the 0.25" in above
    zero = explain.ded_lead([ded_point(1.0, 0.0)] * 3, 0.0, 0.9)
    assert "exactly the same" in zero


def test_partition_error_and_modality_leads_follow_the_numbers():
    lead = explain.partition_lead([0.9, 0.2, 0.8, 0.7, 0.1], [[0, 1], [2, 3, 4], [5]], 0.5)
    assert lead.startswith("3 of 5 neighbouring layer pairs") and "the 6 decoder layers form 3 blocks" in lead
    assert "alone" in explain.partition_lead([0.1, 0.2], [[0], [1], [2]], 0.5)
    assert "no CDM step" in explain.partition_lead([], [], None)
    rows = [layer_error("language", 0, 0.02, 0.03, fp_mse=1.0), layer_error("language", 1, 0.05, 0.05, fp_mse=1.0)]
    lead = explain.layer_error_lead(rows)
    assert "the worst is L1, at 5% of" in lead and "1 of 2 layers" in lead and lead.count(". ") == 0
    wide = [modality_row(0, 6.0, 2.0), modality_row(1, 2.0, 2.0)]
    assert "up to 3.00 times larger than text tokens (at L0)" in explain.modality_lead(wide)
    assert "one clipping range serves both" in explain.modality_lead(wide[1:])


def test_every_expert_column_of_the_interaction_table_is_explained_in_the_legend():
    for column in INTERACTION_COLUMNS[1:]:
        name = column.replace(" (5%)", "")
        assert f"*{name}" in explain.INTERACTION_LEGEND, column


def test_every_analysis_view_has_a_lead_a_browser_test_can_find():
    panel = AnalysisPanel(SimpleNamespace())
    with gr.Blocks():
        panel.layout()
    ids = {"partition-lead": panel.partition_lead, "ded-lead": panel.ded_lead,
           "interaction-lead": panel.interaction_lead, "error-lead": panel.error_lead, "veo-lead": panel.veo_lead,
           "modality-lead": panel.modality_lead}
    assert {elem_id: c.elem_id for elem_id, c in ids.items()} == {elem_id: elem_id for elem_id in ids}


def test_a_fractional_count_is_refused_not_rounded():
    from qvlm.ui.inputs import parse_count
    with pytest.raises(ValueError, match="DED samples must be a whole number from 2 to 64"):
        parse_count(2.5, 2, 64, "DED samples")
    assert parse_count(8.0, 2, 64, "DED samples") == 8


def test_partition_title_and_lead_count_the_same_blocks():
    entropies, blocks = [0.9, 0.2, 0.8, 0.7, 0.1], [[0, 1], [2, 3, 4], [5]]
    title = plots.partition_figure(entropies, blocks, h0=0.5).layout.title.text
    lead = explain.partition_lead(entropies, blocks, 0.5)
    n = re.search(r"\((\d+) blocks\)", title).group(1)
    assert f"form {n} blocks" in lead


def test_interaction_bars_and_lead_give_the_same_share():
    pairs = [pair(k, s) for k, s in enumerate((0.0123, 0.0456, 0.031))]
    (bars,) = plots.interaction_figure(pairs, 0.10).data
    top = max(zip(bars.y, bars.text, bars.x))
    lead = explain.interaction_lead(pairs)
    assert f"at most {top[1]}" in lead and top[2] in lead


def test_ded_plot_annotation_and_lead_give_the_same_r2_and_chance_level():
    points = [ded_point(0.1 * i, 0.01 * ((7 * i) % 5)) for i in range(16)]
    fit = LinearFit(0.01, 0.0, 0.069)
    fig = plots.ded_scatter(points, 2, "entropy", fit, r2_chance=0.25)
    r2, chance = re.search(r"R² = ([\d.]+) \(chance level ([\d.]+)", fig.layout.annotations[0].text).groups()
    lead = explain.ded_lead(points, fit.r2, 0.25)
    assert f"R² of {r2} is below {chance}" in lead


def test_modality_table_ratio_and_lead_agree():
    rows = [modality_row(0, 6.1, 2.0), modality_row(1, 2.0, 2.0)]
    top = max(r.ratio for r in rows)
    assert f"up to {top:.2f} times larger" in explain.modality_lead(rows)


def test_the_vision_lead_names_the_worst_site_and_its_share():
    rows = [SiteError(0, "qkv", 0.001, 0.2), SiteError(2, "fc2", 0.004, 0.8)]
    lead = explain.vision_sites_lead(rows)
    assert lead.startswith("Layer 2's fc2 input loses the most: 80%") and lead.count(". ") == 0
    assert "weights" in explain.vision_sites_lead([replace(rows[0], error=0.0)])
    assert explain.vision_sites_lead([]) == ""
    m = SiteMap(layer=1, site="fc1", bits=4, samples=2, abs=[[1.0]], token_range=[1.0], channel_range=[1.0],
                levels_token=0.35, levels_channel=2.8)
    assert "0.35 of the 16 levels" in explain.site_map_sentence(m) and "large in every token" in explain.site_map_sentence(m)


def test_the_vision_view_refuses_without_a_variant_and_with_bad_counts():
    app = SimpleNamespace(session=lambda request: SimpleNamespace(variants=SimpleNamespace(find_label=lambda l: None)))
    panel = AnalysisPanel(app)
    with gr.Blocks():
        panel.layout()
    (out,) = list(panel.compute_vision_sites(None, 4))
    assert "Quantize a model first" in out[panel.vision_note]
    assert "Quantize a model first" in panel.show_vision_map(None, 0, "fc1", 4)[panel.vision_map_note]


def test_the_acceptance_sentence_says_why_blocks_went_back_to_the_init():
    search = [
        search_row([0, 1], True, {"calibration": [0.1, 0.2], "holdout": [0.1, 0.2]}),
        search_row([2], False, {"calibration": [0.3, 0.2]}),
        search_row([3], False, {"calibration": [0.1, 0.2], "holdout": [0.3, 0.2]}),
        search_row([4], True),  # the search kept the incumbent itself
    ]
    from qvlm.quant.acceptance import acceptance_sentence

    text = acceptance_sentence(search)
    assert text.startswith("The search proposed new ranges in 3 of 4 blocks and kept them in 1")
    assert "1 went back to the init's ranges because they raised" in text and "not on unseen ones" in text
    assert acceptance_sentence([search_row([0], True)]).startswith(
        "The joint search found nothing better")
    assert acceptance_sentence([]) == ""
