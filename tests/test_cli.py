"""CLI: eval prints accuracy per type and writes JSON; bad input is one clear line, exit status 2."""

import json

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
    argv = ["quantize", "--model", str(bundled_dir), "--bits", "w4a4", "--method", "qlora", "--out", str(out),
            "--save", str(tmp_path / "export"), "--format", "compressed-tensors"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: compressed-tensors has no NormalFloat (NF4) weights") and "qvlm-packed" in err
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
