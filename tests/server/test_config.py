"""Configuration: a ``--config`` TOML file, ``SCORING_*`` variables and flags (each overriding the
one before), ``--print-config``, and a policy set by configuration seen in a decision."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from scoring.server.__main__ import parse_args
from scoring.server.agent import FakeAgent
from scoring.server.config import HIDDEN, Settings

from .conftest import ROOT, ServerProcess, example_body, upload, wait_for

FILE = """
database = "sqlite:///from-file.db"
tie_band = 0.1
locality_wait_s = 5
max_attempts = 4
start_timeout_s = 20
region_affinity = [["us-east", "us-west", 0.6]]

[weights]
region = 3
warm = 0
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "scoring.toml"
    path.write_text(FILE)
    return path


def test_the_file_sets_what_nothing_else_does(config: Path) -> None:
    s = Settings.load(config)
    assert (s.database, s.tie_band, s.locality_wait_s, s.max_attempts, s.start_timeout_s) == (
        "sqlite:///from-file.db", 0.1, 5.0, 4, 20.0
    )  # fmt: skip
    policy = s.policy()
    assert (policy.tie_band, policy.locality_wait_s) == (0.1, 5.0)
    assert policy.affinity("us-west", "us-east") == 0.6
    # keys the file names change; the others keep the library's defaults
    assert dict(policy.weights.items()) == {"region": 3.0, "load": 1.0, "pool": 0.5, "warm": 0.0,
                                            "gpu": 1.0, "reliability": 1.0}  # fmt: skip


def test_environment_overrides_the_file_and_flags_override_both(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCORING_TIE_BAND", "0.2")
    monkeypatch.setenv("SCORING_MAX_ATTEMPTS", "5")
    monkeypatch.setenv("SCORING_WEIGHTS__WARM", "7")  # one key of a table
    monkeypatch.setenv("SCORING_LOCALITY_WAIT_S", "9")
    s = parse_args(["--config", str(config), "--tie-band", "0.3", "--locality-wait", "0"])
    assert s.database == "sqlite:///from-file.db"  # file only
    assert s.max_attempts == 5  # environment over file
    assert s.tie_band == 0.3  # flag over environment over file
    assert s.locality_wait_s == 0.0  # a flag of 0 still overrides
    weights = s.policy().weights
    assert (weights["region"], weights["warm"]) == (3.0, 7.0)  # file and environment merged
    # without the file, the environment alone; without either, the defaults
    assert parse_args([]).tie_band == 0.2
    monkeypatch.delenv("SCORING_TIE_BAND")
    assert parse_args([]).tie_band == Settings.model_fields["tie_band"].default


def test_slot_holds_take_their_configured_times(tmp_path: Path) -> None:
    from scoring.server.app import create_app

    path = tmp_path / "scoring.toml"
    path.write_text("slot_hold_s = 2.5\nowner_grace_s = 0.5\n")
    settings = Settings.load(path, database=f"sqlite:///{tmp_path / 'db.sqlite'}",
                             files_dir=str(tmp_path / "files"))  # fmt: skip
    app = create_app(settings)
    holds = app.state.server.holds
    app.state.server.database.dispose()
    assert (holds.hold_s, holds.grace_s) == (2.5, 0.5)


def test_boolean_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "scoring.toml"
    path.write_text("slot_holds = true\nrefresh_each_round = false\n")
    assert parse_args(["--config", str(path)]).slot_holds is True
    s = parse_args(["--config", str(path), "--no-slot-holds", "--refresh-each-round"])
    assert (s.slot_holds, s.refresh_each_round) == (False, True)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("tie_band = 2\n", "tie_band"),
        ("[weights]\nregion = -1\n", "weights.region"),
        ("[weights]\nspeed = 1\n", "speed"),
        ("tie_bnad = 0.1\n", "tie_bnad"),
        ('region_affinity = [["eu", "eu", 0.5]]\n', "region_affinity"),
    ],
    ids=["out-of-range", "negative-weight", "unknown-factor", "misspelt-key", "same-region"],
)
def test_a_bad_file_is_refused_by_the_field(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "scoring.toml"
    path.write_text(text)
    with pytest.raises(ValidationError, match=where):
        Settings.load(path)


def test_a_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Settings.load(tmp_path / "nope.toml")


def test_print_config_reads_back_and_hides_secrets(config: Path, tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(ROOT), "SCORING_SECRET": "s3cr3t-value", "PATH": "/usr/bin:/bin"}
    url = "postgresql+psycopg://scoring:pa55word@db.internal/scoring"
    out = subprocess.run(
        [sys.executable, "-m", "scoring.server", "--config", str(config), "--print-config",
         "--database", url, "--port", "8123"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert "s3cr3t-value" not in out and "pa55word" not in out
    assert f'secret = "{HIDDEN}"' in out
    printed = tmp_path / "printed.toml"
    printed.write_text(out)
    again = Settings.load(printed)
    original = Settings.load(config, database=url, port=8123, secret="s3cr3t-value")
    hidden = {"secret", "database"}
    assert again.model_dump(exclude=hidden) == {
        **original.model_dump(exclude=hidden),
        "weights": dict(original.policy().weights.items()),  # printed in full
    }
    assert again.policy() == original.policy()


def test_a_configured_policy_shows_in_the_decision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only the region counts (file), and us-east/us-west are 0.8 alike (environment): the one
    # agent's score is its region factor, 0.8. The library's defaults would give another score.
    path = tmp_path / "scoring.toml"
    path.write_text("[weights]\nregion = 1\nload = 0\npool = 0\nwarm = 0\ngpu = 0\n"
                    "reliability = 0\n")  # fmt: skip
    monkeypatch.setenv("SCORING_REGION_AFFINITY", '[["us-west", "us-east", 0.8]]')
    server = ServerProcess(tmp_path, "--config", str(path), demo_agents=1)
    server.start()
    agent_id, key = next(iter(server.demo["agent_keys"].items()))
    agent = FakeAgent(server.url, key, agent_id, region="us-east", task_seconds=60)
    try:
        agent.step()
        with server.client() as client:
            body = {**example_body(upload(client)), "submitter_region": "us-west"}
            r = client.post(f"/r/workflows/{server.demo['workflow_id']}/run", json=body)
            assert r.status_code == 202, r.text
            task = r.json()["task_id"]

            def dispatched() -> dict[str, str] | None:
                agent.step()
                status = client.get(f"/r/tasks/{task}").json()
                return status if status["task_status"] != "queued" else None

            status = wait_for(dispatched, timeout=30)
    finally:
        agent.close()
        server.stop()
    assert status["agent_id"] == agent_id
    assert status["explain"].startswith(f"{agent_id} (score 0.800)"), status["explain"]


def test_the_readme_configuration_is_valid(tmp_path: Path) -> None:
    text = (ROOT / "README.md").read_text()
    after = text[text.index("### Configuration, administration, metrics") :]
    start = after.index("```toml\n") + len("```toml\n")
    path = tmp_path / "scoring.toml"
    path.write_text(after[start : after.index("```", start)])
    s = Settings.load(path)
    assert s.database.startswith("postgresql") and s.start_timeout_s == 60.0
    policy = s.policy()
    assert policy.affinity("us-west", "us-east") == 0.6 and policy.weights["warm"] == 2.0
