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
