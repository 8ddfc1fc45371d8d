"""`fedfleet export RUN_DIR`: CSV and Parquet of every ledger table, and the books every view shows."""

from __future__ import annotations

import csv
import json

import pyarrow.parquet as pq

from fedfleet.coordinator.cli import main as cli
from fedfleet.coordinator.records.accounts import accounts
from fedfleet.coordinator.records.columns import COLUMNS
from fedfleet.coordinator.records.ledger import Ledger


def _ledger(tmp_path):
    run_dir = tmp_path / "run"
    ledger = Ledger(run_dir / "ledger.sqlite")
    ledger.start_run("r1", {"strategy": "fedavg"})
    ledger.record("r1", 1, "agent-00", "ok", bytes_up=1000, bytes_down=3000, energy_compute_j=1.5,
                  energy_radio_j=0.25, energy_idle_j=4.0, profile="rpi4b", energy_meter="model")
    ledger.record("r1", 1, "agent-01", "rejected:replayed", detail="2 status messages refused")
    ledger.record_traffic("r1", 1, "agent-00", {"model": (0, 50_000), "task": (0, 3000), "result": (1000, 0),
                                                 "control": (80, 9)}, (1100, 53_100))
    ledger.record_round("r1", 1, accuracy=0.5, loss=1.0, wall_s=0.2, selected=2, ok=1, rejected=1,
                        bytes_up=1000, bytes_down=3000)
    ledger.close()
    return run_dir


def test_export_writes_every_table_as_csv_and_parquet(tmp_path, capsys):
    run_dir = _ledger(tmp_path)
    assert cli(["export", str(run_dir)]) == 0
    out = run_dir / "export"
    for table, columns in COLUMNS.items():
        with open(out / f"{table}.csv") as fh:
            rows = list(csv.reader(fh))
        assert rows[0] == [c for c in columns if c], table
        pt = pq.read_table(out / f"{table}.parquet")
        assert pt.column_names == rows[0] and pt.num_rows == len(rows) - 1, table
    traffic = pq.read_table(out / "traffic.parquet").to_pydict()
    assert sum(traffic["bytes_down"]) == 53_009 and str(pq.read_table(out / "traffic.parquet").schema.field("bytes_up").type) == "int64"
    books = json.loads((out / "books.json").read_text())["r1"]
    assert books["all_device_traffic"]["total"] == 54_089
    assert books["model_updates"]["total"] == 4000 and books["socket"]["total"] == 54_200
    assert books["energy_j"]["compute_j"] == 1.5 and books["refusals"]["rows"] == 1
    assert "traffic.csv" in capsys.readouterr().out


def test_accounts_one_definition(tmp_path):
    run_dir = _ledger(tmp_path)
    ledger = Ledger(run_dir / "ledger.sqlite")
    try:
        acc = accounts(ledger.query, "r1")
        round1 = accounts(ledger.query, "r1", 1)
        none = accounts(ledger.query, "r1", 2)
    finally:
        ledger.close()
    assert acc.all == (1080, 53_009) and acc.updates == (1000, 3000) and acc.socket == (1100, 53_100)
    assert acc.joules == 5.75 and acc.refusals == 1
    assert round1.all == acc.all
    assert none.all == (0, 0) and none.energy is None and none.socket is None  # "not recorded", never 0 J


def test_export_of_a_missing_run_dir_is_one_line(tmp_path, capsys):
    assert cli(["export", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ledger not found" in err


def test_report_shows_the_books(tmp_path):
    import html
    import re

    from fedfleet.coordinator.records.report import render

    run_dir = _ledger(tmp_path)
    page = render(run_dir).read_text()
    text = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))
    assert "What the devices paid for" in text
    assert "All device traffic 0.001 0.053" in text and "Model updates only 0.001 0.003" in text
    assert "model 0.000 0.050 92.4%" in text  # bytes by category, with their share
    assert "learning (compute) 1.5 26.1%" in text  # the learning apart from radio and idle
    # modelled, from the shipped profile's figures, with their sources
    assert "modelled from the profile's power figures" in text and "pidramble.com" in text
