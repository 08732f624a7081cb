"""Flower's deployment engine end to end on loopback: a real SuperLink (TLS, SuperNode
authentication, a state database, no runtime dependency installation) and three real SuperNodes
as separate processes, each with its own auth key and node config (mixed LoRA ranks).

1. two rounds of FedEx-LoRA with ranks 4/8/8 on the tiny model: metrics, exact aggregation;
2. a SuperNode with an unregistered key is refused;
3. a fourth SuperNode copy-pasted with ``partition-id=0`` makes the run refused before round 1,
   naming both nodes and the fix (:mod:`fedlora.node_check`);
4. one SuperNode is killed during a round and the run completes with the other two.

Certificates, keys and the federation entry come from :mod:`fedlora.commands.deploy`. Every process
started here (and what they start: SuperExec, ServerApp and ClientApp processes) is killed at the
end of the module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedlora.commands.deploy import generate_certs, write_federation

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FEDERATION = "fedlora-test"
RANKS = (4, 8, 8)
TOOLS = ("flower-superlink", "flower-supernode", "flwr")

pytestmark = [
    pytest.mark.skipif(any(not (BIN / t).exists() and not shutil.which(t) for t in TOOLS),
                       reason=f"needs Flower's {', '.join(TOOLS)} executables"),
    pytest.mark.timeout(600),
]

BASE_RUN_CONFIG = ('model.name_or_path="tiny" model.gguf_package="" num_clients=3 strategy.name="fedex" '
                   'client_ranks="4,8,8" dataset.max_length=96 eval.max_examples=8 train.local_steps=3 '
                   'strategy.min_clients=2')


def _exe(name: str) -> str:
    return str(BIN / name) if (BIN / name).exists() else shutil.which(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc; Flower's SuperExec runs in its own session)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_tree(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Signal ``proc``'s process group and the process group of each descendant, then reap."""
    if proc.poll() is not None and not _descendants(proc.pid):
        return
    pids = [proc.pid, *_descendants(proc.pid)]
    groups = set()
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    groups.discard(os.getpgid(0))  # never our own group
    for group in groups:
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        for group in groups:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=10)
    deadline = time.time() + 10
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() and _alive(p) for p in pids[1:]):
        time.sleep(0.2)
    for pid in pids[1:]:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Federation:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.home = tmp / "flwr-home"
        self.port = _free_port()
        self.env = dict(os.environ, FLWR_HOME=str(self.home), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
                        PYTHONUNBUFFERED="1")
        self.procs: list[subprocess.Popen] = []
        self.nodes: list[subprocess.Popen] = []
        self.certs = generate_certs(tmp / "certs", ["127.0.0.1", "localhost"],
                                    ["node0", "node1", "node2", "rogue", "twin"])
        self.node_ids: dict[str, int] = {}  # name → Flower node id, from `flwr supernode register`
        write_federation(FEDERATION, f"127.0.0.1:{self.port}", self.certs["ca_cert"], home=self.home)
        self.app = ROOT

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "wb")
        proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=self.tmp)
        log.close()
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([_exe("flwr"), *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                              cwd=self.tmp)

    def start_superlink(self) -> None:
        c = self.certs
        self.start("superlink", [
            _exe("flower-superlink"), "--ssl-ca-certfile", str(c["ca_cert"]), "--ssl-certfile", str(c["server_cert"]),
            "--ssl-keyfile", str(c["server_key"]), "--enable-supernode-auth", "--database", str(self.tmp / "state.db"),
            "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(self.port)])
        deadline = time.time() + 60
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.procs[0].poll() is not None:
                break
            time.sleep(0.5)
        raise RuntimeError("the SuperLink did not start:\n" + self.log("superlink")[-3000:])

    def register(self, name: str) -> None:
        out = self.flwr("supernode", "register", str(self.certs["nodes"][name]["public"]), FEDERATION)
        assert out.returncode == 0 and "registered" in out.stdout, out.stdout + out.stderr
        self.node_ids[name] = int(re.search(r"SuperNode (\d+) registered", out.stdout).group(1))

    def start_supernode(self, name: str, node_config: str, *extra: str) -> subprocess.Popen:
        return self.start(name, [
            _exe("flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
            "--root-certificates", str(self.certs["ca_cert"]),
            "--auth-supernode-private-key", str(self.certs["nodes"][name]["private"]),
            "--node-config", node_config, "--port", str(_free_port()), *extra])  # own Runtime API port per node

    def node_list(self) -> list[dict]:
        out = self.flwr("supernode", "ls", FEDERATION, "--format", "json")
        assert out.returncode == 0, out.stdout + out.stderr
        return json.loads(out.stdout[out.stdout.index("{"):])["nodes"]

    def wait_online(self, count: int, timeout: float = 90, exactly: bool = False) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            online = sum(n["status"] == "online" for n in self.node_list())
            if online == count or (online > count and not exactly):
                return
            time.sleep(1)
        logs = "\n".join(self.log(f"node{i}")[-1500:] for i in range(3))
        raise RuntimeError(f"fewer than {count} SuperNodes online after {timeout} s:\n{logs}")

    def run(self, run_dir: Path, extra: str, **kwargs) -> subprocess.Popen:
        overrides = f'{BASE_RUN_CONFIG} run_dir="{run_dir}" {extra}'
        return subprocess.Popen([_exe("flwr"), "run", str(self.app), FEDERATION, "--run-config", overrides, "--stream"],
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=self.tmp, start_new_session=True, **kwargs)

    def close(self) -> None:
        for proc in reversed(self.procs):  # nodes first, the SuperLink last
            _kill_tree(proc)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    fed = Federation(tmp_path_factory.mktemp("deployment"))
    try:
        fed.start_superlink()
        for i, rank in enumerate(RANKS):
            fed.register(f"node{i}")
            fed.nodes.append(fed.start_supernode(f"node{i}", f"partition-id={i} num-partitions=3 lora-rank={rank}"))
        fed.wait_online(3)
        yield fed
    finally:
        fed.close()


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _finish(fed: Federation, proc: subprocess.Popen, timeout: float = 400) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        raise AssertionError("flwr run did not finish in time:\n" + fed.log("superlink")[-3000:])
    return out


def test_two_rounds_mixed_ranks_tls_and_node_auth(federation, tmp_path):
    run_dir = tmp_path / "run"
    proc = federation.run(run_dir, "num_rounds=2 strategy.round_timeout=60")
    out = _finish(federation, proc)
    assert proc.returncode == 0, out[-4000:]
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2], out[-4000:]
    assert [r["clients"] for r in rows[1:]] == [3, 3]
    assert all(r["agg_error"] < 1e-5 for r in rows[1:])  # FedEx-LoRA is exact across ranks 4, 8, 8
    assert all(r["eval_loss"] is not None and r["bytes_up"] > 0 for r in rows[1:])
    assert "ranks [4, 8]" in out


def test_unregistered_supernode_is_refused(federation):
    before = {n["node-id"] for n in federation.node_list()}
    proc = federation.start_supernode("rogue", "partition-id=0 num-partitions=3", "--max-retries", "1")
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("a SuperNode with an unregistered key kept running:\n" + federation.log("rogue")[-2000:])
    log = federation.log("rogue")
    assert proc.returncode != 0, log[-2000:]
    assert "Failed to activate SuperNode" in log, log[-2000:]
    assert {n["node-id"] for n in federation.node_list()} == before


def test_two_supernodes_on_one_partition_are_refused_before_round_1(federation, tmp_path):
    """A fourth SuperNode whose node config is node0's (``partition-id=0``): without the check both
    would train partition 0 and the run would report it as one more client. The ServerApp refuses
    the run after discovery, before the server's model is built or round 0 is written."""
    federation.register("twin")
    twin = federation.start_supernode("twin", "partition-id=0 num-partitions=3 lora-rank=4")
    run_dir = tmp_path / "run"
    try:
        federation.wait_online(4)
        proc = federation.run(run_dir, "num_rounds=1 strategy.round_timeout=30")
        out = _finish(federation, proc, timeout=200)
    finally:
        _kill_tree(twin)  # SIGTERM: the SuperNode deactivates itself, so the next test sees three nodes
        federation.wait_online(3, exactly=True)
    first, second = sorted([federation.node_ids["node0"], federation.node_ids["twin"]])
    # `flwr run --stream` itself exits 0 whatever the ServerApp did; the run's own status says it failed
    run_id = re.search(r"Successfully started run (\d+)", out).group(1)
    listed = federation.flwr("ls", FEDERATION, "--run-id", run_id, "--format", "json")
    runs = json.loads(listed.stdout[listed.stdout.index("{"):])["runs"]
    assert [r["status"] for r in runs] == ["finished:failed"], listed.stdout
    assert "the connected nodes' configs are inconsistent (1 problem); the run is refused before round 1" in out, \
        out[-4000:]
    assert (f"partition 0 is claimed by 2 nodes (node {first}, node {second}): its rows would train twice; "
            f"node {second} duplicates node {first}; stop node {second}, or raise num_clients in the run config "
            "(every partition 0..2 is held)") in out, out[-4000:]
    assert "fedlora: 4 clients" not in out and "training on" not in out
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "config.yaml").exists()


def test_killed_supernode_run_completes_with_the_others(federation, tmp_path):
    run_dir = tmp_path / "run"
    proc = federation.run(run_dir, "num_rounds=2 strategy.round_timeout=45")
    victim = federation.nodes[2]
    deadline = time.time() + 300
    while time.time() < deadline and not _rows(run_dir) and proc.poll() is None:
        time.sleep(0.5)  # the round-0 row is written right before round 1's messages go out
    assert _rows(run_dir), "the run never reached round 1:\n" + (proc.stdout.read() if proc.poll() is not None else "")
    time.sleep(2)
    _kill_tree(victim, signal.SIGKILL)
    out = _finish(federation, proc)
    assert proc.returncode == 0, out[-4000:]
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2], out[-4000:]
    assert [r["clients"] for r in rows[1:]] == [2, 2], rows
    assert all(r["agg_error"] < 1e-5 for r in rows[1:])
