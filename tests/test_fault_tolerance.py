"""Fault tolerance in real Flower simulations: clients that send bad replies, are slow, or fail.

Each simulation runs this file as a script (``python tests/test_fault_tolerance.py SPEC``): it
builds the config from Hydra overrides and wraps fedlora's own ClientApp so that chosen partitions
misbehave in chosen rounds (``FAULTS``). The server must name every rejected client (partition and
node) with its reason in ``metrics.jsonl`` and the log, aggregate the others when at least
``strategy.min_clients`` remain, and otherwise keep the previous global adapter and mark the round
skipped. ``tests/test_resume.py`` uses the ``kill_driver`` fault to stop a run mid-round.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlora.commands.compare import compare
from fedlora.rundir.checkpoint import load_checkpoint, round_dirs

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


def faulty_client_app(cfg, faults: dict[int, dict[int, str]], driver_pid: int, record_dir: str,
                      straggle_seconds: float = 0.0):
    """fedlora's ClientApp, with ``faults[partition][round]`` = one of :data:`FAULTS`."""
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
        fault = faults.get(pid, {}).get(rnd)
        if record_dir:  # what each client was sent, to check what the server kept
            arrays = {k: v.numpy() for k, v in msg.content["global"].items()}
            np.savez(Path(record_dir) / f"sent-p{pid}-r{rnd}.npz", **arrays)
        if fault == "kill_driver":  # the whole run stops here, mid-round, like a crash or kill -9
            os.killpg(os.getpgid(driver_pid), signal.SIGKILL)
        if fault == "dropped":
            raise RuntimeError(f"partition {pid} crashed (test fault)")
        if fault == "straggler":
            time.sleep(straggle_seconds)
        reply = inner(msg, context)
        if fault in ("nan", "wrong_keys", "wrong_shape", "wrong_rank", "oversized"):
            return Message(corrupt(reply.content, fault), reply_to=msg)
        return reply

    return app


def main(spec: dict) -> None:
    """Compose the config like ``fedlora simulate`` does and run it with the faulty clients."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from fedlora.commands.cli import conf_dir
    from fedlora.config import config_from_dict
    from fedlora.commands.simulate import simulate

    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        data = OmegaConf.to_container(compose(config_name="config", overrides=spec["overrides"]), resolve=True)
    cfg = config_from_dict(data)
    faults = {int(p): {int(r): f for r, f in by_round.items()} for p, by_round in spec.get("faults", {}).items()}
    simulate(cfg, spec["run_dir"], client_app=faulty_client_app(cfg, faults, os.getpid(), spec.get("record_dir", ""),
                                                                 spec.get("straggle_seconds", 0.0)))


def run_faulty(tmp: Path, overrides: list[str], faults: dict[int, dict[int, str]], record: bool = False,
               straggle_seconds: float = 0.0) -> subprocess.CompletedProcess:
    """Run one simulation with ``faults[partition][round]`` in a fresh session (so a ``kill_driver``
    fault takes down exactly that run, and whatever it leaves is cleaned up)."""
    run_dir = tmp / "run"
    spec = {"overrides": overrides, "run_dir": str(run_dir), "faults": faults,
            "record_dir": str(tmp) if record else "", "straggle_seconds": straggle_seconds}
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


# ---------------------------------------------------------------------------------------------
# the tests: one simulation, a fault per partition


ROUND1 = {0: "nan", 1: "wrong_keys", 2: "wrong_shape", 3: "wrong_rank", 4: "oversized", 5: "dropped", 6: "straggler"}
"""Round 1: partitions 0–6 misbehave, 7 and 8 are honest (= strategy.min_clients): the round goes on."""
TIMEOUT = 45


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory) -> tuple[Path, list[dict], str]:
    """9 clients, min_clients=2, 2 rounds. Round 1: one fault per partition 0–6, partitions 7 and 8
    honest, so the round goes on with them. Round 2: partitions 0–7 fail, one reply is left
    (< min_clients), so the round is skipped."""
    tmp = tmp_path_factory.mktemp("faults")
    faults = {p: {1: ROUND1.get(p, None), 2: "dropped"} for p in range(8)}
    overrides = [*TINY, "num_clients=9", "num_rounds=2", "strategy.min_clients=2", f"strategy.round_timeout={TIMEOUT}"]
    proc = run_faulty(tmp, overrides, faults, straggle_seconds=3 * TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    run_dir = tmp / "run"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, rows, proc.stdout + proc.stderr


def reason_for(rows: list[dict], rnd: int, partition: int) -> str:
    """The one rejection reason recorded for ``partition`` in round ``rnd``."""
    found = [r for r in rows[rnd].get("rejected_reasons", []) if r.startswith(f"partition {partition} (node ")]
    assert len(found) == 1, rows[rnd].get("rejected_reasons")
    return found[0]


@pytest.mark.parametrize("partition,expected", [
    (0, r"non-finite values in model\.layers\.\d+\..*\.lora_B \(1 of \d+\)"),
    (1, r"wrong keys: 1 missing \['model\..*\.lora_B'\], 0 unexpected \[\]"),
    (2, r"wrong shape: model\..*\.lora_A is \(8, \d+\), expected \(8, \d+\)"),
    (3, r"wrong rank: model\..*\.lora_A has rank 4, but this client was sent rank 8"),
    (4, r"oversized reply: \d+ bytes > \d+ \(strategy\.max_reply_bytes\)"),
    (5, r"dropped: the client failed or left \(RuntimeError: partition 5 crashed \(test fault\)\)$"),
    (6, rf"straggler: no reply within strategy\.round_timeout={TIMEOUT}\.0 s"),
], ids=[ROUND1[p] for p in range(7)])
def test_each_bad_reply_is_rejected_with_the_client_and_the_reason(faulty_run, partition, expected):
    _, rows, log = faulty_run
    reason = reason_for(rows, 1, partition)
    assert re.search(expected, reason, re.S), reason
    assert f"round 1: rejected reply: {reason.splitlines()[0]}" in log  # logged too, not only in metrics


def test_the_round_goes_on_with_the_clients_that_remain(faulty_run):
    run_dir, rows, _ = faulty_run
    r1 = rows[1]
    assert (r1["clients"], r1["rejected"]) == (2, 7) and "skipped" not in r1
    assert r1["eval_loss"] < rows[0]["eval_loss"] and 0 < r1["agg_error"] < 1  # two honest updates aggregated
    assert r1["bytes_up"] > 8_000_000  # the oversized reply was received (and counted), then refused


def test_too_few_usable_replies_keep_the_previous_global_adapter(faulty_run):
    run_dir, rows, log = faulty_run
    r2 = rows[2]
    assert r2["skipped"] is True and (r2["clients"], r2["rejected"]) == (1, 8)
    assert r2["eval_loss"] is None and r2["train_loss"] is None and r2["agg_error"] is None
    assert "round 2: 1 usable replies < min_clients=2; keeping the previous global adapter" in log
    before, after = (load_checkpoint(d) for d in round_dirs(run_dir))  # rounds 1 and 2
    assert (before.round, after.round) == (1, 2)
    for name, f in before.state.adapter.items():
        assert torch.equal(f.A, after.state.adapter[name].A) and torch.equal(f.B, after.state.adapter[name].B)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_eval_loss"] == rows[1]["eval_loss"]  # the kept adapter is the final one


def test_the_summary_report_and_compare_say_which_rounds_were_skipped_and_replies_rejected(faulty_run, tmp_path):
    # Execute
    run_dir, rows, log = faulty_run
    summary = json.loads((run_dir / "summary.json").read_text())
    report = (run_dir / "report.md").read_text()
    out = compare([run_dir], out=tmp_path)
    # Assert: final values carry their round; counts and caveats in every place a result is read
    assert (summary["planned_rounds"], summary["completed_rounds"], summary["skipped_rounds"]) == (2, 1, [2])
    assert summary["rejected_replies"] == 7 + 8
    assert (summary["final_eval_round"], summary["final_train_round"]) == (1, 1)
    assert summary["caveats"] == [
        "round 2 skipped (too few usable replies; the previous global adapter stayed)",
        "15 client replies rejected (see rejected_reasons in metrics.jsonl)",
    ]
    assert "1 of 2 rounds completed" in report and "(after round 1)" in report
    assert "> **Not a clean run**: round 2 skipped" in report and "**skipped**: previous adapter kept" in report
    assert "this run is not clean: round 2 skipped" in log
    md = out["md"].read_text()
    assert f"| 1/2 ⚠ | {summary['final_eval_loss']:.4f} (r1) ★ |" in md  # ★: a lone run is its own Pareto front
    assert "- ⚠ run: round 2 skipped (too few usable replies; the previous global adapter stayed); 15 client " in md
    row = next(csv.DictReader(out["csv"].open()))
    assert (row["completed_rounds"], row["skipped_rounds"], row["rejected_replies"], row["final_eval_round"]) == (
        "1", "2", "15", "1")


# ---------------------------------------------------------------------------------------------
# the checks themselves, on every strategy's payload (no simulation)


@pytest.mark.parametrize("name", ["fedavg", "ffa", "fedsb"])
def test_reply_checks_cover_each_strategys_payload(name):
    from fedlora.adapters.state import LoraFactors, state_to_arrays
    from fedlora.config import FedloraConfig, StrategyConfig
    from fedlora_server.strategy import make_strategy

    strategy = make_strategy(FedloraConfig(strategy=StrategyConfig(name=name)))
    r = 4
    start = {"l0": LoraFactors(torch.randn(r, 6), torch.randn(5, r), 2.0)}
    if name == "fedsb":
        start = {"l0": LoraFactors(torch.randn(r, r), torch.eye(r), 2.0)}
    good = state_to_arrays(start, strategy.parts)
    assert strategy.check_reply(good, start) is None
    part = {"fedavg": "lora_B", "ffa": "lora_B", "fedsb": "lora_R"}[name]
    bad = {**good, f"l0.{part}": good[f"l0.{part}"][:, :2] if part != "lora_R" else good["l0.lora_R"][:2, :2]}
    assert strategy.check_reply(bad, start).startswith("wrong rank: l0." + part + " has rank 2")
    assert strategy.check_reply({**good, "l0.lora_X": good["l0.scale"]}, start).startswith("wrong keys: 0 missing")
    nan = {k: v.copy() for k, v in good.items()}
    nan["l0.scale"][0] = np.inf
    assert strategy.check_reply(nan, start) == "non-finite values in l0.scale (1 of 1)"
    ints = {**good, f"l0.{part}": good[f"l0.{part}"].astype(np.int32)}
    assert strategy.check_reply(ints, start).startswith("wrong dtype")
    assert strategy.max_reply_bytes(start) == 4 * sum(v.nbytes for v in good.values()) + 2**20


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
