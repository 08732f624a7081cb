"""End to end: a real Flower simulation (Ray backend) of the ``fedlora simulate`` CLI on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from fedlora.model.tiny import build_tiny_model, build_tiny_tokenizer

TINY = ["model=tiny", "dataset.max_length=96", "eval.max_examples=16", "eval.client_eval=true",
        "train.local_steps=6", "train.lr=0.01", "train.batch_size=4"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, run_cli) -> Path:
    out = tmp_path_factory.mktemp("sim") / "run"
    proc = run_cli("simulate", *TINY, "num_rounds=2", "num_clients=2", f"hydra.run.dir={out}", cwd=out.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


def test_simulation_writes_every_output(run_dir):
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "partition_stats.json", "eval_loss.png",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (run_dir / name).is_file(), name


def test_metrics_rows_have_real_numbers(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["strategy"] == "fedavg" for r in rows)
    assert [r["clients"] for r in rows[1:]] == [2, 2]
    # learning happened: held-out loss below its round-0 value, on the server and on clients
    assert rows[2]["eval_loss"] < rows[0]["eval_loss"] - 0.05
    assert rows[2]["client_eval_loss"] < rows[0]["eval_loss"]
    # FedAvg trains A and B, so its aggregate is inexact but close
    assert all(0 < r["agg_error"] < 1 for r in rows[1:])


def test_bytes_match_the_adapter_size(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    factors = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    factor_bytes = sum(t.numel() * 4 for t in factors.values())  # fp32 A and B of every layer
    n_arrays = len(factors) * 3 // 2  # lora_A, lora_B and scale per layer
    overhead = n_arrays * 256  # .npy header and key per array
    for r in rows[1:]:
        for key in ("bytes_up", "bytes_down"):
            per_client = r[key] / r["clients"]
            assert factor_bytes <= per_client <= factor_bytes + overhead, (key, per_client, factor_bytes)


def test_final_adapter_loads_in_peft_and_improves_the_base(run_dir):
    tokenizer = build_tiny_tokenizer()
    model = PeftModel.from_pretrained(build_tiny_model(len(tokenizer), seed=0), run_dir / "adapter").eval()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.count_nonzero(p) > 0 for p in lora_b)  # the global adapter was trained
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_eval_loss"] < summary["initial_eval_loss"]
    assert summary["versions"]["flwr"].startswith("1.")


@pytest.mark.parametrize(
    "override,message",
    [
        ("strategy.name=fedmagic", "strategy='fedmagic' is unknown; choose one of"),
        ("+train.learning_rate=0.1", "unknown config key(s) train.learning_rate"),
        ("dataset.path=/nonexistent/data.jsonl", "/nonexistent/data.jsonl"),
        ("dataset.prompt_field=problem", "'problem' not found in test.jsonl"),
        ("num_clients=2000", "2000"),
    ],
)
def test_bad_input_fails_before_the_simulation_starts(tmp_path, run_cli, override, message):
    proc = run_cli("simulate", "model=tiny", override, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    assert "Starting" not in proc.stdout + proc.stderr  # no Ray/Flower start-up happened


def test_run_report_and_manifest(run_dir):
    report = (run_dir / "report.md").read_text()
    assert "| round | clients |" in report and "eval_loss.png" in report and "## Reproducibility" in report
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert len(manifest["config_sha256"]) == 64 and manifest["seeds"]["run"] == 0
    assert manifest["versions"]["torch"].startswith("2.")


def test_same_config_gives_identical_metrics(run_dir, tmp_path, run_cli):
    again = tmp_path / "again"
    proc = run_cli("simulate", *TINY, "num_rounds=2", "num_clients=2", f"hydra.run.dir={again}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = ([{k: v for k, v in json.loads(line).items() if not k.endswith("seconds")}
                      for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (run_dir, again))
    assert first == second
