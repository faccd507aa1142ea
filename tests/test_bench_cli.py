"""`tinylora bench`: one behaviour for every target — a table by default, every figure as
JSON with --json (nothing else on stdout), a progress bar on stderr unless --no-progress or
--json. Tiny sizes: these check the command, not the speed."""
import json
from pathlib import Path

import pytest

from tinylora.cli import build_parser, main
from tinylora.cli.bench_cmd import _TARGETS, _qlora_table

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _target_parsers():
    bench = next(a for a in build_parser()._actions
                 if hasattr(a, "choices") and isinstance(a.choices, dict) and "bench" in a.choices)
    sub = next(a for a in bench.choices["bench"]._actions
               if hasattr(a, "choices") and isinstance(a.choices, dict))
    return sub.choices


def test_every_target_has_json_and_no_progress():
    parsers = _target_parsers()
    assert set(parsers) == set(_TARGETS)
    for name, p in parsers.items():
        flags = {s for a in p._actions for s in a.option_strings}
        assert {"--json", "--no-progress"} <= flags, name


@pytest.mark.parametrize("argv,header", [
    (["infer", "--config", "nanogpt-cpu", "--repeats", "1"], "merged_vs_base"),
    (["qlora", "--config", "nanogpt-cpu", "--matrix", "64", "--steps", "1"], "weight_ratio"),
])
def test_a_table_by_default_json_with_json(argv, header, capsys):
    assert main(["bench", *argv]) == 0
    out, err = capsys.readouterr()
    assert header in out.splitlines()[0]              # a table, not JSON
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)
    assert err.strip(), "no progress shown on stderr"
    assert main(["bench", *argv, "--json"]) == 0
    out, err = capsys.readouterr()
    rows = json.loads(out)
    assert isinstance(rows, list) and rows[0]["target"] == argv[0]
    assert err == ""                                   # --json: no bar either
    assert main(["bench", *argv, "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_the_qlora_table_reads_the_stored_figures():
    stored = json.loads((RESULTS / "qlora.json").read_text())
    row = stored[0] if isinstance(stored, list) else stored
    text = _qlora_table(row)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["model", "lora_weight_mb", "qlora_weight_mb", "weight_ratio"]
    assert lines[2].startswith("gpt") and lines[3].startswith("matrix")
    assert str(row["gpt"]["weight_memory_ratio"]).rstrip("0") in lines[2]
