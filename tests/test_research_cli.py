"""``python -m scoring.research.sweep`` and ``python -m scoring.research.goals``: the research
drivers on top of the simulation."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from scoring.sim import SimConfig, simulate
from scoring.sim.policies import POLICY_NAMES


def test_weight_sweep_ranks_weightings_and_shows_baselines():
    from scoring.research.sweep import markdown, sweep

    config = SimConfig(n_agents=16, n_tasks=150, n_teams=4)
    grid = [None, {"warm": 4.0, "region": 2.0}, {"load": 4.0}]
    rows = sweep(config, grid, seeds=(0, 1), baselines=("random",))
    labels = [label for label, _ in rows]
    assert sorted(labels[:3]) == sorted(["engine defaults", "warm=4 region=2", "load=4"])
    assert labels[3] == "random"
    objectives = [m["objective"] for _, m in rows[:3]]
    assert objectives == sorted(objectives)
    # the objective is relative to the engine defaults on the same seeds: exactly 3 for them
    assert dict(rows)["engine defaults"]["objective"] == pytest.approx(3.0)
    # each row averages the two seeds' runs
    one = simulate(replace(config, seed=1, weights={"load": 4.0}), "scorer").metrics
    zero = simulate(replace(config, seed=0, weights={"load": 4.0}), "scorer").metrics
    load_row = dict(rows)["load=4"]
    assert load_row["cold_load_rate"] == pytest.approx(
        (one["cold_load_rate"] + zero["cold_load_rate"]) / 2
    )
    table = markdown(rows, top=2)
    assert len(table.splitlines()) == 2 + 2 + 1  # header, rule, two scorer rows, one baseline
    assert "| - | random |" in table


def test_optuna_search_asks_and_measures_each_trial():
    from scoring.research.sweep import OBJECTIVE, optuna_search

    config = SimConfig(n_agents=16, n_tasks=120, n_teams=4)
    reference = simulate(config, "scorer").metrics
    rows = optuna_search(config, 3, seeds=(0,), reference=reference, batch=2, progress=False)
    assert len(rows) == 3
    labels = [label for label, _ in rows]
    assert len(set(labels)) == 3 and all("warm=" in label for label in labels)
    for _, m in rows:
        assert all(m[k] > 0 for k in OBJECTIVE) and m["completed"] == 120


def test_goal_check_by_hand():
    from scoring.research.goals import check

    def m(cold, ovh, p95, jain=0.97, teams=(2.0, 4.0)):
        out = {"cold_load_rate": cold, "overhead_p95_s": ovh, "latency_p95_s": p95,
               "fairness_jain": jain}  # fmt: skip
        out |= {f"slowdown_team_{t}": x for t, x in enumerate(teams)}
        return out

    metrics = {
        "scorer": m(0.13, 80.0, 100.0, 0.96, (2.1, 4.0)),
        "least_loaded": m(0.50, 90.0, 120.0, 0.98, (2.0, 4.0)),
        "multiplex": m(0.30, 100.0, 110.0),
        "gie": m(0.25, 95.0, 120.0),
        "startup": m(0.40, 120.0, 130.0),
        "delay": m(0.20, 110.0, 112.0),
    }
    rows = check(metrics)
    # cold 0.13 / delay 0.20 = 0.65 (met); overhead 80 / gie 95 = 0.842 (> 0.8: missed);
    # p95 100 / multiplex 110 = 0.909 (> 0.9: missed); Jain 0.96 (met);
    # team 0: 2.1 / 2.0 = 1.05 (met), team 1: 4.0 / 4.0 = 1.0
    assert [r["reference"].split()[0] for r in rows[:3]] == ["delay", "gie", "multiplex"]
    assert [r["ratio"] for r in rows[:3]] == pytest.approx([0.65, 80 / 95, 100 / 110])
    assert [r["met"] for r in rows] == [True, False, False, True, True]
    assert rows[4]["reference"] == "team 0" and rows[4]["ratio"] == pytest.approx(1.05)
    least_loaded_beats_it = metrics | {"scorer": m(0.13, 80.0, 100.0, 0.9, (2.3, 4.0))}
    assert [r["met"] for r in check(least_loaded_beats_it)][3:] == [False, False]


def test_goal_command_writes_tables(tmp_path, capsys):
    from scoring.research.goals import main as goals

    argv = ["--trace", "none", "--agents", "12", "--tasks", "60", "--teams", "3", "--loads",
            "0.2,0.3", "--seeds", "0", "--serial", "--no-progress", "--locality-wait", "5",
            "--out", str(tmp_path)]  # fmt: skip
    assert goals(argv) == 0
    out = capsys.readouterr().out
    assert out.count("#### load") == 2 and "cold_load_rate <= 0.7 x best anchor" in out
    doc = json.loads((tmp_path / "goals.json").read_text())
    assert [(s["load"], s["seed"]) for s in doc["scenarios"]] == [(0.2, 0), (0.3, 0)]
    assert set(doc["scenarios"][0]["metrics"]) == set(POLICY_NAMES)
    assert (tmp_path / "goals.md").read_text().startswith("#### load 0.2, seed 0")
    # Re-running only the scorer against the anchors' earlier metrics gives the same tables.
    again = tmp_path / "again"
    reuse = ["--reuse", str(tmp_path / "goals.json"), "--policies", "scorer", "--out", str(again)]
    assert goals([*argv[:-2], *reuse]) == 0
    assert (again / "goals.md").read_text() == (tmp_path / "goals.md").read_text()
    with pytest.raises(SystemExit):  # nothing to compare the scorer with
        goals([*argv[:-2], "--policies", "scorer", "--out", str(again)])
    with pytest.raises(SystemExit):  # the earlier run has no load 0.5
        goals([*argv[:-2], *reuse, "--loads", "0.5"])


def test_the_simulator_never_imports_research():
    """Imports go one way: research uses the simulator; the simulator and its command line run
    without loading any of it."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    sim = Path(__file__).parents[1] / "scoring" / "sim"
    imports = re.compile(r"^\s*(from|import)\s+scoring\.research", re.MULTILINE)
    assert not [p.name for p in sim.glob("*.py") if imports.search(p.read_text())]
    code = (
        "import sys, scoring.sim, scoring.sim.cli, scoring.sim.plots; "
        "print([m for m in sys.modules if m.startswith('scoring.research')])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_emulation_entry_point_runs_the_simulator_with_the_cold_rules(tmp_path):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "scoring.research.emulate", "--agents", "8", "--tasks", "40",
         "--teams", "2", "--policies", "cold:lru", "--out", str(tmp_path), "--no-plots"],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    assert "cold:lru" in done.stdout
