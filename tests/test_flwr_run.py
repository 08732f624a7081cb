"""``flwr run .`` against a real local SuperLink (simulation mode): the Flower run config reaches
the same dataclasses as ``fedlora simulate`` and the run writes its metrics."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def superlink(tmp_path):
    """A SuperLink in simulation mode that runs apps in this environment (no runtime installs)."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    port = _free_port()
    env = dict(os.environ, FLWR_HOME=str(home), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    proc = subprocess.Popen(
        [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--disable-runtime-dependency-installation",
         "--host", "127.0.0.1", "--port", str(port), "--database", str(home / "state.db")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.5)
    yield env
    os.killpg(proc.pid, 15)  # the SuperLink and the SuperExec/simulation processes it started
    proc.wait(timeout=30)


def test_flwr_run_trains_with_the_run_config(superlink, tmp_path):
    run_dir = tmp_path / "run"
    overrides = (f'model.name_or_path="tiny" model.gguf_package="" num_rounds=2 run_dir="{run_dir}" '
                 'eval.max_examples=8 dataset.max_length=96 train.lr=0.01 train.local_steps=6')
    proc = subprocess.run([str(BIN / "flwr"), "run", str(ROOT), "test", "--run-config", overrides, "--stream"],
                          env=superlink, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert [r["clients"] for r in rows[1:]] == [2, 2]
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    shutil.rmtree(run_dir)
