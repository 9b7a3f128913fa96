"""scripts/fault_injection.py on a few kill points: SIGKILLed runs resume to bit-equal final weights, a failed save
on a full disk leaves the previous checkpoint usable, and the harness does notice a resume that is not exact."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Kills real training runs many times over: minutes. `make test-all` runs it.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
HARNESS = REPO / "scripts" / "fault_injection.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "SWANLAB_MODE": "disabled"}


def run_harness(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict[str, dict]]:
    """The harness's exit status and its result rows by kill point; its work directory is tmp_path / "work"."""
    results = tmp_path / "results.json"
    cmd = [sys.executable, str(HARNESS), "--keep", str(tmp_path / "work"), "--json", str(results), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=600)
    rows = {row["kill_point"]: row for row in json.loads(results.read_text())} if results.exists() else {}
    return done, rows


@pytest.fixture(scope="module")
def harness_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("fault_injection")
    done, rows = run_harness(tmp_path, "--only", "step:5,save:6:unsealed,save:9:mid_rotation,disk_full:6")
    return done, rows, tmp_path / "work"


def test_killed_runs_resume_to_the_exact_final_weights(harness_run):
    done, rows, _ = harness_run
    print(done.stdout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    expected = {"step:5": "checkpoint-3", "save:6:unsealed": "checkpoint-3", "save:9:mid_rotation": "checkpoint-9"}
    for point, resumed_from in expected.items():
        row = rows[point]
        assert row["kills"] == 1, f"{point}: the fault must kill the run once"
        assert row["resumed_from"] == [resumed_from], f"{point}: resumed from {row['resumed_from']}"
        assert row["max_diff"] == 0.0 and row["verdict"] == "exact"


def test_a_full_disk_stops_the_save_and_the_previous_checkpoint_resumes(harness_run):
    _, rows, work = harness_run
    row = rows["disk_full:6"]
    assert row["kills"] == 0, "the save must fail with an error, not kill the process"
    assert row["resumed_from"] == ["checkpoint-3"]
    assert row["max_diff"] == 0.0 and row["verdict"] == "exact"
    error = (work / "disk_full_6" / "attempt-1.error").read_text()
    assert "could not write" in error and "checkpoint-6" in error and "File too large" in error
    assert "checkpoint-3, is intact" in error and "--resume_from_checkpoint true" in error


def test_the_harness_catches_a_resume_that_is_not_exact(tmp_path):
    done, rows = run_harness(tmp_path, "--only", "step:5", "--sabotage")
    assert done.returncode == 1
    assert rows["step:5"]["max_diff"] > 0 and "final weights differ" in rows["step:5"]["verdict"]
