"""``python -m scoring.sim``: arguments, the printed table, metrics.json and the plots."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from scoring.sim.cli import main, parse_policies, parse_weights


def test_cli_writes_table_json_and_plots(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "--agents", "16", "--tasks", "120", "--teams", "4", "--policies", "scorer,random",
        "--weights", "warm=3,region=2", "--seed", "3", "--out", str(out), "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "wait p95" in printed and "scorer" in printed and "random" in printed
    assert "'warm': 3.0" in printed
    doc = json.loads((out / "metrics.json").read_text())
    assert set(doc["metrics"]) == {"scorer", "random"}
    assert doc["metrics"]["scorer"]["completed"] == 120
    assert doc["config"]["weights"] == {"warm": 3.0, "region": 2.0}
    for name in ("wait_cdf", "rates", "overhead", "utilisation"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_module_entry_point_runs(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "scoring.sim", "--agents", "8", "--tasks", "40", "--teams", "2",
         "--policies", "least_loaded", "--out", str(tmp_path), "--no-plots"],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    assert "least_loaded" in done.stdout


def test_argument_parsing():
    assert parse_weights("region=2, warm=0.5") == {"region": 2.0, "warm": 0.5}
    assert parse_policies("p2c,scorer") == ["p2c", "scorer"]
    for bad in ("speed=1", "region", "region=fast"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_weights(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_policies("fifo")
