"""Simulation overhead and scale on the tiny model, in Flower's simulation engine (Ray backend).

    python benchmarks/sim_overhead.py                       # 10 and 100 clients, then 1,000 sampled
    python benchmarks/sim_overhead.py --clients 10 --no-scale --tag before

**Overhead** (10 and 100 clients, every client trains every round, ``fraction_train=1.0``): per
round, the server's wall time of the round (``seconds`` in ``metrics.jsonl``: discovery, sending,
all clients' work, aggregation, the server's eval) divided by the sum of the clients' own
local-training seconds in that round (``client_train_seconds``, the sum of each reply's
``train_seconds``). 1.0 means the round costs exactly the clients' training done one after the
other; the simulation runs ``cores / client_cpus`` clients at once, so an engine with no overhead
would come in below 1.0. Round 1 is reported separately (Ray workers start, the caches fill).

**Scale** (1,000 clients, 10 sampled per round, 3 rounds): peak memory of the whole process tree
(driver, Ray's GCS/raylet and workers), sampled every 0.25 s from ``/proc``: the summed RSS
(counts shared pages once per process, so it overstates) and the summed PSS (shared pages split
between the processes that map them: the honest total).

Each configuration runs ``fedlora simulate`` in its own process (a fresh Ray instance). Results:
``benchmarks/results/sim_overhead.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TRAIN = ["model=tiny", "dataset.max_length=96", "train.local_steps=4", "train.batch_size=4", "train.lr=0.01",
         "eval.max_examples=16", "eval.client_eval=false"]
"""What every client runs each round: 4 local AdamW steps at batch 4 on the tiny 2-layer Llama."""


# ---------------------------------------------------------------------------------------------
# memory of a process tree, from /proc (no psutil needed)


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def tree(root: int) -> list[int]:
    """``root`` and all its descendants."""
    kids, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _kib(path: str, field: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_memory(root: int) -> dict[str, float]:
    """Summed RSS and PSS (MiB) and process count of ``root``'s tree right now."""
    pids = tree(root)
    rss = sum(_kib(f"/proc/{p}/status", "VmRSS:") for p in pids)
    pss = sum(_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)
    return {"rss_mib": rss / 1024, "pss_mib": pss / 1024, "processes": len(pids)}


class PeakSampler(threading.Thread):
    """Samples :func:`tree_memory` of a process every ``interval`` seconds; keeps the peaks."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.stop = pid, interval, threading.Event()
        self.peak = {"rss_mib": 0.0, "pss_mib": 0.0, "processes": 0}

    def run(self) -> None:
        while not self.stop.is_set():
            now = tree_memory(self.pid)
            self.peak = {k: max(self.peak[k], now[k]) for k in self.peak}
            self.stop.wait(self.interval)


# ---------------------------------------------------------------------------------------------
# one simulation


def simulate(overrides: list[str], run_dir: Path) -> dict:
    """Run ``fedlora simulate`` in a subprocess; returns its metrics rows, wall time and memory peak."""
    env = dict(os.environ, RAY_DEDUP_LOGS="0", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "fedlora.commands.cli", "simulate", *overrides, f"hydra.run.dir={run_dir}"]
    started, cpu = time.perf_counter(), _children_cpu()
    proc = subprocess.Popen(cmd, cwd=run_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = PeakSampler(proc.pid)
    sampler.start()
    out, _ = proc.communicate()
    sampler.stop.set()
    sampler.join()
    wall = time.perf_counter() - started
    cpu = _children_cpu() - cpu  # the whole tree's CPU seconds (Ray reaps its workers, the driver reaps Ray)
    if proc.returncode != 0:
        raise RuntimeError(f"simulation failed ({' '.join(overrides)}):\n{out[-4000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"rows": rows, "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
            "peak": {k: round(v, 1) for k, v in sampler.peak.items()}}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def overhead(num_clients: int, rounds: int, work: Path) -> dict:
    overrides = [*TRAIN, f"num_clients={num_clients}", f"num_rounds={rounds}", "strategy.fraction_train=1.0"]
    res = simulate(overrides, work / f"overhead_{num_clients}")
    per_round = []
    for r in res["rows"][1:]:
        per_round.append({"round": r["round"], "clients": r["clients"], "round_seconds": r["seconds"],
                          "client_train_seconds": r["client_train_seconds"],
                          "overhead": round(r["seconds"] / r["client_train_seconds"], 3)})
    later = per_round[1:] or per_round
    return {"num_clients": num_clients, "rounds": rounds, "overrides": overrides, "per_round": per_round,
            "overhead_round1": per_round[0]["overhead"],
            "overhead_later_rounds": round(sum(r["round_seconds"] for r in later) / sum(r["client_train_seconds"] for r in later), 3),
            "total_wall_seconds": res["wall_seconds"], "total_cpu_seconds": res["cpu_seconds"], "peak": res["peak"]}


def scale(num_clients: int, per_round: int, rounds: int, work: Path) -> dict:
    overrides = [*TRAIN, f"num_clients={num_clients}", f"num_rounds={rounds}",
                 f"strategy.fraction_train={per_round / num_clients}", f"strategy.min_clients={per_round}"]
    res = simulate(overrides, work / f"scale_{num_clients}")
    return {"num_clients": num_clients, "sampled_per_round": per_round, "rounds": rounds, "overrides": overrides,
            "clients_per_round": [r["clients"] for r in res["rows"][1:]],
            "round_seconds": [r["seconds"] for r in res["rows"][1:]],
            "total_wall_seconds": res["wall_seconds"], "total_cpu_seconds": res["cpu_seconds"], "peak": res["peak"]}


# ---------------------------------------------------------------------------------------------
# report


def machine() -> dict:
    import flwr
    import ray
    import torch

    mem = _kib("/proc/meminfo", "MemTotal:") / 2**20
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1), "python": platform.python_version(),
            "torch": torch.__version__, "flwr": flwr.__version__, "ray": ray.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M"), "load_average_at_start": os.getloadavg()[0]}


def markdown(result: dict, level: int = 1) -> str:
    """The result as Markdown; a ``before`` result (``--before``) follows one heading level down."""
    h, m = "#" * level, result["machine"]
    load = m.get("load_average_at_start")
    lines = [f"{h} Simulation overhead and scale ({result['tag']})", "",
             "Produced by `python benchmarks/sim_overhead.py` (see its docstring for the definitions).", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']}, "
             f"torch {m['torch']}, flwr {m['flwr']}, ray {m['ray']}; {m['date']}"
             + (f"; load average {load:.1f} at the start (the cores are shared with other work)." if load is not None else "."),
             "", f"Every client: `{' '.join(TRAIN)}`.", ""] + ([result["note"], ""] if result.get("note") else [])
    if result["overhead"]:
        lines += [f"{h}# Overhead: round wall time / Σ clients' local-training time", "",
                  "| clients | round 1 | later rounds | per round (s): wall / Σ train | run wall (s) | run CPU (s) | peak PSS (MiB) |",
                  "|---:|---:|---:|---|---:|---:|---:|"]
        for o in result["overhead"]:
            detail = ", ".join(f"{r['round_seconds']:.1f}/{r['client_train_seconds']:.1f}" for r in o["per_round"])
            cpu = o.get("total_cpu_seconds")
            lines.append(f"| {o['num_clients']} | {o['overhead_round1']:.2f}× | {o['overhead_later_rounds']:.2f}× | "
                         f"{detail} | {o['total_wall_seconds']:.0f} | {'–' if cpu is None else f'{cpu:.0f}'} | "
                         f"{o['peak']['pss_mib']:.0f} |")
        lines.append("")
    if result["scale"]:
        s = result["scale"]
        cpu = s.get("total_cpu_seconds")
        lines += [f"{h}# Scale: {s['num_clients']} clients, {s['sampled_per_round']} sampled per round, {s['rounds']} rounds", "",
                  "| clients per round | round seconds | run wall (s) | run CPU (s) | peak RSS Σ (MiB) | peak PSS Σ (MiB) | processes |",
                  "|---|---|---:|---:|---:|---:|---:|",
                  f"| {s['clients_per_round']} | {s['round_seconds']} | {s['total_wall_seconds']:.0f} | "
                  f"{'–' if cpu is None else f'{cpu:.0f}'} | {s['peak']['rss_mib']:.0f} | {s['peak']['pss_mib']:.0f} | "
                  f"{s['peak']['processes']} |", ""]
    if result.get("before"):
        lines += [markdown(result["before"], level + 1)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="*", default=[10, 100], help="overhead runs (all clients train)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scale", type=int, default=1000, help="clients of the sampled scale run")
    ap.add_argument("--no-scale", action="store_true")
    ap.add_argument("--tag", default="sim_overhead", help="result file name stem in benchmarks/results/")
    ap.add_argument("--before", type=Path, help="a previous result .json (e.g. of the code before a change) to show beside")
    ap.add_argument("--note", default="", help="a line to print under the heading (what was measured)")
    args = ap.parse_args()
    result = {"tag": args.tag, "note": args.note, "machine": machine(), "overhead": [], "scale": None}
    if args.before:
        result["before"] = json.loads(args.before.read_text())
    with tempfile.TemporaryDirectory(prefix="fedlora-bench-") as tmp:
        for n in args.clients:
            result["overhead"].append(o := overhead(n, args.rounds, Path(tmp)))
            print(f"{n} clients: overhead round 1 {o['overhead_round1']:.2f}x, later {o['overhead_later_rounds']:.2f}x", flush=True)
        if not args.no_scale:
            result["scale"] = s = scale(args.scale, 10, args.rounds, Path(tmp))
            print(f"{args.scale} clients: {s['clients_per_round']} per round, peak PSS {s['peak']['pss_mib']:.0f} MiB", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.tag}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
