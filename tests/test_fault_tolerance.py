"""Fault tolerance in real Flower simulations: clients that send bad replies, are slow, or fail.

Each simulation runs this file as a script (``python tests/test_fault_tolerance.py SPEC``): it
builds the config from Hydra overrides and wraps fedlora's own ClientApp so that chosen partitions
misbehave in chosen rounds (``FAULTS``). The server must name every rejected client (partition and
node) with its reason in ``metrics.jsonl`` and the log, aggregate the others when at least
``strategy.min_clients`` remain, and otherwise keep the previous global adapter and mark the round
skipped. ``tests/test_resume.py`` uses the ``kill_driver`` fault to stop a run mid-round.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve()
TINY = ["model=tiny", "dataset.max_length=64", "eval.max_examples=4", "train.local_steps=2",
        "train.lr=0.01", "train.batch_size=4", "client_cpus=0.5"]

FAULTS = ("nan", "wrong_keys", "wrong_shape", "wrong_rank", "oversized", "dropped", "straggler", "kill_driver",
          "record_global")
"""What a faulty partition does in a round (see :func:`corrupt`)."""


# ---------------------------------------------------------------------------------------------
# the faulty ClientApp (runs inside the simulation's client workers)


def corrupt(content, fault: str):
    """A copy of a train reply's RecordDict, damaged as ``fault`` says."""
    from flwr.app import Array, ArrayRecord, RecordDict

    arrays = {k: v.numpy().copy() for k, v in content["update"].items()}
    first = sorted(k for k in arrays if k.endswith(".lora_B"))[0]
    layer = first[: -len(".lora_B")]
    if fault == "nan":
        arrays[first][0, 0] = np.nan
    elif fault == "wrong_keys":  # B of one layer left out: must not be filled in from what was sent
        del arrays[first]
    elif fault == "wrong_shape":
        a = arrays[f"{layer}.lora_A"]
        arrays[f"{layer}.lora_A"] = np.zeros((a.shape[0], a.shape[1] + 3), np.float32)
    elif fault == "wrong_rank":  # every layer at half the rank it was sent
        for key in [k for k in arrays if k.endswith(".lora_A")]:
            r = arrays[key].shape[0] // 2
            arrays[key] = np.ascontiguousarray(arrays[key][:r])
            b = key[: -len("A")] + "B"
            arrays[b] = np.ascontiguousarray(arrays[b][:, :r])
    out = RecordDict({k: v for k, v in content.items() if k != "update"})
    out["update"] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    if fault == "oversized":  # a valid update plus 8 MB of padding
        out["padding"] = ArrayRecord({"x": Array(np.zeros(2_000_000, np.float32))})
    return out


def faulty_client_app(cfg, faults: dict[int, dict], driver_pid: int, record_dir: str):
    """fedlora's ClientApp, with ``faults[partition] = {"fault": …, "rounds": [...], "seconds": …}``."""
    from flwr.app import Message
    from flwr.clientapp import ClientApp

    from fedlora_client.app import make_client_app

    inner = make_client_app(cfg)
    app = ClientApp()

    @app.query()
    def query(msg, context):
        return inner(msg, context)

    @app.evaluate()
    def evaluate(msg, context):
        return inner(msg, context)

    @app.train()
    def train(msg, context):
        pid, rnd = int(context.node_config["partition-id"]), int(msg.content["config"]["round"])
        spec = faults.get(pid, {})
        fault = spec.get("fault") if rnd in spec.get("rounds", []) else None
        if record_dir:  # what each client was sent, to check what the server kept
            arrays = {k: v.numpy() for k, v in msg.content["global"].items()}
            np.savez(Path(record_dir) / f"sent-p{pid}-r{rnd}.npz", **arrays)
        if fault == "kill_driver":  # the whole run stops here, mid-round, like a crash or kill -9
            os.killpg(os.getpgid(driver_pid), signal.SIGKILL)
        if fault == "dropped":
            raise RuntimeError(f"partition {pid} crashed (test fault)")
        if fault == "straggler":
            time.sleep(float(spec["seconds"]))
        reply = inner(msg, context)
        if fault in ("nan", "wrong_keys", "wrong_shape", "wrong_rank", "oversized"):
            return Message(corrupt(reply.content, fault), reply_to=msg)
        return reply

    return app


def main(spec: dict) -> None:
    """Compose the config like ``fedlora simulate`` does and run it with the faulty clients."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from fedlora.cli import conf_dir
    from fedlora.config import config_from_dict
    from fedlora.simulation import simulate

    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        data = OmegaConf.to_container(compose(config_name="config", overrides=spec["overrides"]), resolve=True)
    cfg = config_from_dict(data)
    faults = {int(k): v for k, v in spec.get("faults", {}).items()}
    simulate(cfg, spec["run_dir"], client_app=faulty_client_app(cfg, faults, os.getpid(), spec.get("record_dir", "")))


def run_faulty(tmp: Path, overrides: list[str], faults: dict, record: bool = False) -> subprocess.CompletedProcess:
    """Run one simulation with ``faults`` in a fresh process group (its own session, so a
    ``kill_driver`` fault takes down exactly that run and its workers)."""
    run_dir = tmp / "run"
    spec = {"overrides": overrides, "run_dir": str(run_dir), "faults": faults,
            "record_dir": str(tmp) if record else ""}
    env = dict(os.environ, RAY_DEDUP_LOGS="0", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, str(HERE), json.dumps(spec)], cwd=tmp, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        kill_session(proc.pid)  # whatever of this run is left (Ray workers after a kill_driver fault)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def kill_session(sid: int) -> None:
    """SIGKILL every process left in session ``sid`` (one this test started with start_new_session)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # fields after "(comm)": state ppid pgrp session …
            try:
                os.kill(int(stat.parent.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
