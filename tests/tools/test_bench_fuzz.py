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


def test_bench_fuzz_methods_smoke(tmp_path, capsys):
    """The hostile corpus per method, two cases per (method, fleet): typed refusals only, nothing bad accepted."""
    out = tmp_path / "fuzz.json"
    assert bench_fuzz.main(["--methods", "all", "--n", "54", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"cases", "crashes", "untyped_errors", "accepted_bad", "serve_exits", "methods"}
    assert result["cases"] == 54 and len(result["methods"]) == 9
    assert result["crashes"] == result["untyped_errors"] == result["accepted_bad"] == result["serve_exits"] == 0
    d = details(capsys.readouterr().err)
    assert set(d["per_pair"]) == {f"{m}/{f}" for m in result["methods"] for f in (2, 3, 10)}
    assert all(p["honest_refused_rows"] == 0 for p in d["per_pair"].values())
