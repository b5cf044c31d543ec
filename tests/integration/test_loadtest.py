"""`loadtest/run.py` end to end: Locust (its own process: it monkey-patches with gevent) against the real stack."""

import csv
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def run_load(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "loadtest" / "run.py"), *args], capture_output=True,
                          text=True, timeout=400)


@pytest.mark.slow
def test_short_mixed_run_writes_csvs_with_the_three_metrics_and_a_plot(stack, tmp_path):
    out = tmp_path / "out"
    result = run_load("--addr", stack, "--duration", "12s", "--rate", "1", "--max-tokens", "4",
                      "--workload", "mixed", "--users", "4", "--out", str(out), "--csv", "load")
    log = (out / "load.log").read_text() if (out / "load.log").exists() else ""
    assert result.returncode == 0, result.stdout + result.stderr + log

    with open(out / "load_stats.csv") as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    e2e = [r for (kind, name), r in rows.items() if kind == "grpc" and name.startswith("e2e ")]
    assert sum(int(r["Request Count"]) - int(r["Failure Count"]) for r in e2e) > 0
    metrics = {name.split()[0] for kind, name in rows if kind == "grpc"}
    assert {"ttft", "tpot", "e2e"} <= metrics
    # Every synthetic request generates max_tokens tokens (min_tokens = max_tokens).
    assert all(float(r["Average Content Size"]) == 4.0 for r in e2e if r["Failure Count"] == "0")

    with open(out / "load_stats_history.csv") as f:
        history = list(csv.DictReader(f))
    assert any(r["Name"].startswith("ttft ") for r in history)
    assert (out / "load.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "requests " in result.stdout and "ttft p50/p90/p99 ms" in result.stdout


def test_run_fails_when_no_server_answers(tmp_path):
    from stack.ports import free_port

    result = run_load("--addr", f"127.0.0.1:{free_port()}", "--duration", "5s", "--connect-timeout", "1",
                      "--out", str(tmp_path))
    assert result.returncode != 0
    assert "no gRPC server answers" in result.stderr


def test_run_refuses_an_unknown_workload_before_starting(tmp_path):
    result = run_load("--workload", "video-only", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "unknown shape 'video-only'" in result.stderr
