"""DP in a real Flower simulation on the tiny model: the ε column, the ledger and the report."""

from __future__ import annotations

import json

from conftest import TINY_SIM


def test_example_level_dp_run_produces_a_cumulative_epsilon_and_a_report(tmp_path, run_cli):
    run_dir = tmp_path / "run"
    proc = run_cli("simulate", *TINY_SIM, "strategy.name=ffa", "dp=example", "dp.target_epsilon=8",
                   f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    eps = [r["epsilon"] for r in rows[1:]]
    assert 0 < eps[0] < eps[1] <= 8.0 + 1e-6  # cumulative over rounds, calibrated to end at ≤ 8
    report = json.loads((run_dir / "privacy_report.json").read_text())
    assert (run_dir / "privacy_report.md").is_file() and (run_dir / "epsilon.png").is_file()
    assert report["worst_client"]["epsilon"] == max(eps) or abs(report["worst_client"]["epsilon"] - max(eps)) < 1e-9


def test_client_level_dp_run_accounts_on_the_server(tmp_path, run_cli):
    run_dir = tmp_path / "run"
    proc = run_cli("simulate", *TINY_SIM, "strategy.name=fedavg", "dp=client", "dp.noise_multiplier=1.0",
                   f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["epsilon"] < rows[2]["epsilon"]
    assert (run_dir / "privacy_report.json").is_file()


def test_client_level_dp_refuses_fedex_before_training(tmp_path, run_cli):
    proc = run_cli("simulate", *TINY_SIM, "strategy.name=fedex", "dp=client", f"hydra.run.dir={tmp_path / 'r'}",
                   cwd=tmp_path)
    assert proc.returncode != 0
    assert "dp.mode=client cannot run with strategy.name=fedex" in proc.stdout + proc.stderr
