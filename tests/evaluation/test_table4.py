"""The stored Table 4 files read as typed records: every file the benchmark wrote, and an older or partial one."""

import json

from qvlm.evaluation.table4 import Table4Result, read_table4
from qvlm.quant.kernels import cpu_kind
from qvlm.ui import plots
from qvlm.ui.panel_results import TABLE4_RESULTS, table4_note


def test_every_stored_table4_reads_with_its_machine_and_rows():
    paths = sorted(TABLE4_RESULTS.glob("table4-*.json"))
    assert paths, "benchmarks/results holds no Table 4"
    for path in paths:
        raw = json.loads(path.read_text())
        result = Table4Result.from_dict(raw, kind=path.stem.removeprefix("table4-"))
        assert len(result.rows) + result.skipped == len(raw["rows"])
        assert result.machine.isa == tuple(raw["machine"]["isa"]) and result.machine.threads == raw["machine"]["threads"]
        assert {r.format for r in result.rows} >= {"FP32"}
        note = table4_note(result)
        assert raw["machine"]["cpu"] in note and f"{raw['machine']['threads']} threads" in note
        assert len(plots.table4_figure(result).data) == 2 * len({r.group for r in result.rows})


def test_rows_that_did_not_run_are_counted_not_drawn_and_missing_facts_get_defaults():
    raw = {"rows": [{"layer": "L", "format": "FP32", "seconds": 0.002, "weight_bytes": 2**20, "speedup_vs_fp32": 1.0,
                     "memory_saving_vs_fp32": 1.0},
                    {"layer": "L", "format": "int8", "error": "no _int_mm here"}], "tokens": 64}
    result = Table4Result.from_dict(raw, kind="avx2")
    assert result.skipped == 1 and [r.format for r in result.rows] == ["FP32"] and result.tokens == (64,)
    assert result.machine.cpu == "unknown CPU" and result.repeats is None
    assert "flags: no flags read" in table4_note(result) and "64 tokens" in table4_note(result)


def test_the_file_of_this_cpu_kind_comes_first_and_an_unreadable_one_is_passed_over(tmp_path):
    row = {"layer": "L", "format": "FP32", "seconds": 1.0, "weight_bytes": 1, "speedup_vs_fp32": 1.0,
           "memory_saving_vs_fp32": 1.0}
    other = "avx2" if cpu_kind() != "avx2" else "vnni"
    (tmp_path / f"table4-{other}.json").write_text(json.dumps({"rows": [row]}))
    assert read_table4(tmp_path).kind == other
    (tmp_path / f"table4-{cpu_kind()}.json").write_text("{not json")
    assert read_table4(tmp_path).kind == other
    (tmp_path / f"table4-{cpu_kind()}.json").write_text(json.dumps({"rows": [row, row]}))
    assert read_table4(tmp_path).kind == cpu_kind() and len(read_table4(tmp_path).rows) == 2
    assert read_table4(tmp_path / "none") is None
