"""A tiny run of `fedfleet bench fuzz`: over a real broker, it prints exactly the keys issue 11 names, and
a few hundred keyless and re-signed mutants neither crash the coordinator nor move the model."""

from __future__ import annotations

import json

from fedfleet.tools.bench import fuzz as bench_fuzz
from fedfleet.tools.bench.output import details


def test_bench_fuzz_smoke(tmp_path, capsys):
    out = tmp_path / "fuzz.json"
    assert bench_fuzz.main(["--n", "600", "--round-deadline", "3", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"cases", "crashes", "untyped_errors", "rss_growth_mb", "rounds_completed", "accepted_bad"}
    assert result["cases"] == 600 and result["rounds_completed"] >= 2
    assert result["crashes"] == 0 and result["untyped_errors"] == 0 and result["accepted_bad"] == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == result
    d = details(captured.err)
    assert d["keyless_rounds_with_all_genuine_results"] == d["rounds_per_half"]["keyless"] >= 1
