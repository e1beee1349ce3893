"""CLI: eval prints accuracy per type and writes JSON; bad input is one clear line, exit status 2."""

import json

import pytest

from qvlm.cli import main


def test_eval_prints_and_writes_json(bundled_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(bundled_dir), "--limit", "24", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "accuracy:" in printed and "answers/second" in printed
    data = json.loads(out.read_text())
    assert data["n"] == 24 and 0.0 <= data["accuracy"] <= 1.0 and set(data["per_type"]) <= {"yes/no", "color", "shape"}


def test_eval_on_a_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: No model folder") and "Traceback" not in err


def test_eval_refuses_a_bad_limit(bundled_dir, capsys):
    assert main(["eval", "--model", str(bundled_dir), "--limit", "0"]) == 2
    assert "--limit" in capsys.readouterr().err


def test_quantize_refuses_an_export_format_that_cannot_hold_the_recipe_before_quantizing(bundled_dir, tmp_path,
                                                                                         capsys):
    out = tmp_path / "run"
    argv = ["quantize", "--model", str(bundled_dir), "--bits", "w4a4", "--recipe", "qlora", "--out", str(out),
            "--save", str(tmp_path / "export"), "--format", "compressed-tensors"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: compressed-tensors") and "NF4" in err and "qvlm-packed" in err
    assert not out.exists()  # refused before any quantization work


def test_a_bundled_model_that_is_not_in_the_checkout_says_how_to_train_it(monkeypatch, tmp_path, capsys):
    from qvlm.models import loader

    monkeypatch.setitem(loader.BUNDLED_MODELS, loader.MOSAIC_MODEL_NAME, tmp_path / "absent")
    assert main(["eval", "--model", "mosaic"]) == 2
    assert "python -m training mosaic" in capsys.readouterr().err


def test_diagnose_stores_each_bit_setting_in_one_report(bundled_dir, tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    import qvlm.evaluation.analysis as analysis

    calls = []

    def fake_diagnostics(handle, cfg, n_samples=None, progress=None, cancel=None):
        calls.append((cfg.bits_label, cfg.recipe, n_samples, cfg.quantize_vision))
        pairs = [SimpleNamespace(interaction_share=0.2, summary=lambda: {"interaction_share": 0.2})]
        return SimpleNamespace(pairs=pairs, verdict="On this model the layers interact: ...",
                               to_dict=lambda: {"pairs": [p.summary() for p in pairs], "verdict": "On this model ..."})

    monkeypatch.setattr(analysis, "dependency_diagnostics", fake_diagnostics)
    out = tmp_path / "report.json"
    assert main(["diagnose", "--model", str(bundled_dir), "--bits", "w4a3,w4a4", "--samples", "4",
                 "--out", str(out)]) == 0
    assert calls == [("W4A3", "qvlm-cdm", 4, True), ("W4A4", "qvlm-cdm", 4, True)]
    stored = json.loads(out.read_text())
    assert set(stored) == {"W4A3", "W4A4"} and stored["W4A3"]["samples"] == 4 and stored["W4A4"]["task"] == "easy-vqa"
    assert "20.0%" in capsys.readouterr().out
    # the language model alone: vision tower unquantized, stored beside the full-model reports
    assert main(["diagnose", "--model", str(bundled_dir), "--bits", "w4a3", "--samples", "4", "--fp-vision",
                 "--out", str(out)]) == 0
    assert calls[-1] == ("W4A3", "qvlm-cdm", 4, False)
    assert set(json.loads(out.read_text())) == {"W4A3", "W4A4", "W4A3 vision FP"}
    assert main(["diagnose", "--model", str(bundled_dir), "--samples", "1", "--out", str(out)]) == 2


def test_progress_bars_label_each_stage_with_its_own_name_and_close_it_at_the_next():
    import io

    from qvlm.cli import StageBars
    from qvlm.utils.progress import Cancelled

    def last_lines(text: str) -> list[str]:
        """What a terminal shows once the bars are done: the last redraw of every line."""
        return [line.split("\r")[-1] for line in text.split("\n") if line.strip("\r")]

    out = io.StringIO()
    with StageBars(file=out) as progress:
        progress("calibration", 0.0, "64 calibration pairs")
        progress("calibration", 1.0, "done")
        progress("veo", 0.5, "language layer 4/8")
        progress("search", 0.5, "block 3/6")
    lines = last_lines(out.getvalue())
    assert [line.split("|")[0] for line in lines] == ["calibration: 100%", "veo: 100%", "search: 100%"]
    assert lines[1].endswith("language layer 4/8") and not any(": :" in line for line in lines)

    out = io.StringIO()
    with pytest.raises(Cancelled), StageBars("W4A3", file=out) as progress:
        progress("init", 1.0, "done")
        progress("eval", 0.25, "1/4 questions")
        raise Cancelled("quantization cancelled")
    assert [line.split("|")[0] for line in last_lines(out.getvalue())] == ["W4A3 init: 100%", "W4A3 eval: cancelled"]


def test_old_recipe_spellings_still_work_and_say_the_new_name(capsys):
    from qvlm.cli import build_parser

    for command, old in (("quantize", "--method"), ("diagnose", "--method"), ("bench", "--recipes")):
        args = build_parser().parse_args([command, old, "rtn", "--out", "x"])
        assert args.recipe == "rtn"
        assert capsys.readouterr().err == f"warning: {old} is now --recipe\n"


def test_quantize_with_the_paper_preset_writes_it_into_the_config(bundled_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["quantize", "--model", str(bundled_dir), "--bits", "w4a4", "--recipe", "rtn", "--preset", "paper",
                 "--calib-size", "2", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["preset"] == "paper" and config["act_granularity_vision"] == "token"


def test_quantize_with_vision_bits_writes_them_and_a_config_file_wins_over_the_preset(bundled_dir, tmp_path):
    out, given = tmp_path / "run", tmp_path / "given.json"
    given.write_text(json.dumps({"act_granularity_vision": "tensor"}))
    assert main(["quantize", "--model", str(bundled_dir), "--bits", "w4a4", "--recipe", "rtn", "--vision-bits",
                 "w4a8", "--preset", "paper", "--config", str(given), "--calib-size", "2", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["vision_w_bits"], config["vision_a_bits"], config["a_bits"]) == (4, 8, 4)
    assert config["act_granularity_vision"] == "tensor" and config["preset"] == "paper"


def test_diagnose_takes_a_preset_and_vision_bits(bundled_dir, tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    import qvlm.evaluation.analysis as analysis

    calls = []

    def fake_diagnostics(handle, cfg, n_samples=None, progress=None, cancel=None):
        calls.append((cfg.preset, cfg.quantize_vision, cfg.tower_bits("vision")))
        return SimpleNamespace(pairs=[], verdict="...", to_dict=lambda: {"pairs": [], "verdict": "..."})

    monkeypatch.setattr(analysis, "dependency_diagnostics", fake_diagnostics)
    out = tmp_path / "report.json"
    assert main(["diagnose", "--model", str(bundled_dir), "--bits", "w4a3", "--samples", "4", "--preset",
                 "authors-code", "--out", str(out)]) == 0
    assert main(["diagnose", "--model", str(bundled_dir), "--bits", "w4a3", "--samples", "4", "--vision-bits",
                 "w8a8", "--out", str(out)]) == 0
    assert calls == [("authors-code", False, (4, 3)), ("recommended", True, (8, 8))]
    assert set(json.loads(out.read_text())) == {"W4A3 vision FP", "W4A3 (vision W8A8)"}
    assert main(["diagnose", "--model", str(bundled_dir), "--preset", "fast", "--out", str(out)]) == 2
    assert "unknown preset 'fast'" in capsys.readouterr().err
