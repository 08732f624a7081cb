"""Server-side aggregation cost per strategy on Llama-2-7B-shaped adapters.

    /work/venv/bin/python benchmarks/aggregation.py            # 32 blocks, 10 and 100 clients
    /work/venv/bin/python benchmarks/aggregation.py --quick    # 2 blocks: a fast check

Shapes: per block q, k, v, o (4096×4096), gate, up (11008×4096) and down (4096×11008), as
(d_out × d_in); rank 16, fp32: 160 MB of factors per client for 32 blocks, so 100 clients held at
once would be 16 GB. Every (strategy, clients) cell runs in a fresh subprocess, whose peak RSS
(``ru_maxrss``) is its memory high-water mark; tracemalloc does not see torch tensors.

How each strategy is measured (wall time counts aggregation only, never the generation of the
synthetic updates, which is seeded per client and layer and done as the update "arrives"):

- streaming (fedavg, ffa, fedsb, hetlora, lorafair): client i's whole update is generated, added
  to the method's accumulator, and dropped; then the accumulator's result. Memory should be flat
  in the number of clients. lorafair uses its sketch (``--sketch-rank``; dense T would be 52 GB).
- layer by layer (fedex, flora): the residual / stack of a layer needs every client's factors of
  that layer, so the n clients' factors of one layer are generated, merged, and the merged term
  handed to a sink that counts its bytes and frees it — as a server that spools replies to disk
  and writes merged layers out as it goes. The merged terms are O(n) by nature (rank (n+1)·r,
  resp. n·r); the table's "result" column shows their total size.

Writes ``benchmarks/results/aggregation.md`` and ``.json`` with the machine's description.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedlora.adapters.state import LoraFactors  # noqa: E402
from fedlora.aggregation import fedavg, fedex, fedsb, ffa, flora, hetlora, lorafair, padding  # noqa: E402
from fedlora.aggregation.common import GlobalState, normalize_weights  # noqa: E402

BLOCK = [  # (name, d_out, d_in)
    ("self_attn.q_proj", 4096, 4096),
    ("self_attn.k_proj", 4096, 4096),
    ("self_attn.v_proj", 4096, 4096),
    ("self_attn.o_proj", 4096, 4096),
    ("mlp.gate_proj", 11008, 4096),
    ("mlp.up_proj", 11008, 4096),
    ("mlp.down_proj", 4096, 11008),
]
STRATEGIES = ["fedavg", "ffa", "fedex", "flora", "fedsb", "lorafair", "hetlora"]
STREAMING = {"fedavg", "ffa", "fedsb", "lorafair", "hetlora"}
ALPHA = 32.0


def layers(blocks: int) -> list[tuple[str, int, int]]:
    return [(f"model.layers.{b}.{name}", d_out, d_in) for b in range(blocks) for name, d_out, d_in in BLOCK]


def _gen(client: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(1_000_003 * (client + 1) + index)


def client_factors(client: int, index: int, d_out: int, d_in: int, rank: int) -> LoraFactors:
    """Client ``client``'s trained factors of layer ``index`` (seeded, uniform)."""
    g = _gen(client, index)
    A = torch.empty(rank, d_in).uniform_(-(d_in**-0.5), d_in**-0.5, generator=g)
    B = torch.empty(d_out, rank).uniform_(-0.01, 0.01, generator=g)
    return LoraFactors(A, B, ALPHA / rank)


def _nbytes(term) -> int:
    return padding.term_nbytes(term)


# ---------------------------------------------------------------------------------------------
# One cell, in its own process


def run_cell(strategy: str, n: int, blocks: int, rank: int, sketch_rank: int) -> dict:
    spec = layers(blocks)
    p = normalize_weights([1.0 + i % 7 for i in range(n)])
    scale = ALPHA / rank
    timed = 0.0
    generated = 0.0
    result_bytes = 0

    def clock(fn, *args):
        nonlocal timed
        t0 = time.perf_counter()
        out = fn(*args)
        timed += time.perf_counter() - t0
        return out

    def make(fn, *args):
        nonlocal generated
        t0 = time.perf_counter()
        out = fn(*args)
        generated += time.perf_counter() - t0
        return out

    if strategy in STREAMING:
        module = {"fedavg": fedavg, "ffa": ffa, "fedsb": fedsb, "hetlora": hetlora, "lorafair": lorafair}[strategy]
        if strategy == "ffa":  # clients send B; A is the run's shared A (the state's)
            shared = {name: client_factors(-1, i, d_out, d_in, rank).A for i, (name, d_out, d_in) in enumerate(spec)}
            state = GlobalState({name: LoraFactors(shared[name], torch.zeros(d_out, rank), scale)
                                 for name, d_out, _ in spec})

            def update(i):
                return {name: LoraFactors(shared[name], client_factors(i, j, d_out, d_in, rank).B, scale)
                        for j, (name, d_out, d_in) in enumerate(spec)}

        elif strategy == "fedsb":  # clients send r×r cores; the frame lives on the server
            frame = {}
            for j, (name, d_out, d_in) in enumerate(spec):
                f = client_factors(-1, j, d_out, d_in, rank)
                frame[name] = (f.B, f.A)
            state = fedsb.initial_state(frame, scale)

            def update(i):
                return {name: LoraFactors(torch.randn(rank, rank, generator=_gen(i, j)), torch.eye(rank), scale)
                        for j, (name, _, _) in enumerate(spec)}

        else:
            state = GlobalState({}, extras={"lorafair_sketch_rank": sketch_rank})

            def update(i):
                return {name: client_factors(i, j, d_out, d_in, rank) for j, (name, d_out, d_in) in enumerate(spec)}

        if strategy == "fedavg":  # fedavg.py predates accumulator()/finish()
            acc = fedavg.FedAvgAccumulator()
            finish = acc.result
        else:
            acc = module.accumulator(state)
            finish = lambda: module.finish(state, acc)  # noqa: E731
        for i in range(n):
            u = make(update, i)
            clock(acc.add, u, p[i])
            del u
        out = clock(finish)
        adapter = out.adapter if isinstance(out, GlobalState) else out
        result_bytes = sum(_nbytes(f) for f in adapter.values())
        if isinstance(out, GlobalState):
            result_bytes += sum(_nbytes(t) for ts in out.base_terms.values() for t in ts)
    else:
        adapter = {}
        for j, (name, d_out, d_in) in enumerate(spec):
            factors = make(lambda: [client_factors(i, j, d_out, d_in, rank) for i in range(n)])
            if strategy == "fedex":
                adapter[name], term = clock(lambda: fedex.aggregate_layer(factors, p, floor=rank, scale=scale))
            else:
                term = clock(flora.stack_layer, factors, p)
                adapter[name] = clock(lambda: flora.fresh_factors(name, d_out, d_in, rank, scale, seed=0, round=1))
            result_bytes += _nbytes(term)  # the sink: count, then free
            del factors, term
        result_bytes += sum(_nbytes(f) for f in adapter.values())
    return {
        "strategy": strategy,
        "clients": n,
        "layers": len(spec),
        "aggregation_s": round(timed, 3),
        "generation_s": round(generated, 3),
        "peak_rss_mib": peak_rss_mib(),
        "result_mib": round(result_bytes / 2**20, 1),
    }


# ---------------------------------------------------------------------------------------------
# Driver


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": round(mem / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def child(*args: str) -> dict:
    """Run ``--cell ARGS`` in a fresh interpreter and return its JSON line."""
    done = subprocess.run([sys.executable, __file__, "--cell", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"cell {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def render(report: dict) -> str:
    cfg, m = report["config"], report["machine"]
    lines = [
        "# Aggregation cost per strategy (Llama-2-7B-shaped adapters)",
        "",
        f"Generated by `{report['command']}` on {report['date']}.",
        "",
        f"- Adapters: {cfg['blocks']} blocks × (q, k, v, o 4096×4096; gate, up 11008×4096; down 4096×11008), "
        f"{cfg['layers']} layers, rank {cfg['rank']}, fp32: {cfg['client_mib']:.0f} MiB of factors per client"
        + ("" if cfg["blocks"] == 32 else f" (**reduced from 32 blocks**; full size ×{32 / cfg['blocks']:.0f})")
        + ".",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, torch {m['torch']} "
        f"({m['torch_threads']} thread{'s' if m['torch_threads'] != 1 else ''} per cell), Python {m['python']}.",
        f"- The CPU is **shared with other engineers' processes**: load average {report['load_before']} before, "
        f"{report['load_after']} after. Wall times are indicative, not a clean-room measurement.",
        f"- Peak RSS is each cell's own process high-water mark (`ru_maxrss`); an idle process that imports "
        f"fedlora and torch peaks at {report['idle_rss_mib']} MiB. Wall time counts aggregation only, not the "
        "generation of the synthetic updates. Torch runs one thread per cell (`--threads`): with two, on a CPU "
        "others are using, OpenMP oversubscription made small-matrix work several times slower.",
        "- Peak RSS of two cells can differ by up to ~100 MiB for reasons unrelated to the client count: glibc's "
        "dynamic mmap threshold makes heap reuse depend on allocation history (run the cells with "
        "`MALLOC_MMAP_THRESHOLD_=131072` to pin it, at some cost in page faults).",
        f"- lorafair accumulates T = ΔW* as a rank-{cfg['sketch_rank']} sketch (exact while n·r ≤ "
        f"{cfg['sketch_rank']}); its dense accumulator would need {cfg['dense_T_gib']:.0f} GiB at this size.",
        "- fedex / flora merge layer by layer; their merged terms (the result column) are O(n) by nature and go "
        "to a sink that counts and frees them, as a server writing merged layers out would.",
        "",
        "| strategy | streams | clients | aggregation (s) | peak RSS (MiB) | over idle (MiB) | result (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["cells"]:
        lines.append(
            f"| {r['strategy']} | {'yes' if r['strategy'] in STREAMING else 'per layer'} | {r['clients']} | "
            f"{r['aggregation_s']:.2f} | {r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] - report['idle_rss_mib']:.0f} | "
            f"{r['result_mib']:.0f} |"
        )
    lines += ["", "Peak memory, 100 clients ÷ 10 clients (over idle):", ""]
    for s in report["config"]["strategies"]:
        cells = {r["clients"]: r["peak_rss_mib"] - report["idle_rss_mib"]
                 for r in report["cells"] if r["strategy"] == s}
        if len(cells) == 2:
            lo, hi = cells[min(cells)], cells[max(cells)]
            lines.append(f"- {s}: {hi / lo:.2f}×")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 blocks instead of 32")
    ap.add_argument("--blocks", type=int, default=None, help="transformer blocks (default 32, --quick 2)")
    ap.add_argument("--clients", default="10,100")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--sketch-rank", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per cell (1: on a CPU shared with others, 2 threads oversubscribe it)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "aggregation"))
    ap.add_argument("--cell", nargs=2, metavar=("STRATEGY", "CLIENTS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    blocks = args.blocks or (2 if args.quick else 32)
    if args.cell:  # a child process: one measurement ("idle": imports only, the table's zero)
        torch.set_num_threads(args.threads)
        strategy, n = args.cell[0], int(args.cell[1])
        idle = {"peak_rss_mib": peak_rss_mib()}
        print(json.dumps(idle if strategy == "idle" else run_cell(strategy, n, blocks, args.rank, args.sketch_rank)))
        return

    strategies = args.strategies.split(",")
    clients = [int(c) for c in args.clients.split(",")]
    report = {
        "command": " ".join(["python benchmarks/aggregation.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {**machine(), "torch_threads": args.threads},
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "idle_rss_mib": child("idle", "0")["peak_rss_mib"],
        "config": {
            "blocks": blocks,
            "layers": 7 * blocks,
            "rank": args.rank,
            "sketch_rank": args.sketch_rank,
            "strategies": strategies,
            "clients": clients,
            "client_mib": 4 * args.rank * sum(d_out + d_in for _, d_out, d_in in layers(blocks)) / 2**20,
            "dense_T_gib": 8 * sum(d_out * d_in for _, d_out, d_in in layers(blocks)) / 2**30,
        },
        "cells": [],
    }
    started = time.perf_counter()
    for strategy in strategies:
        for n in clients:
            cell = child(strategy, str(n), "--blocks", str(blocks), "--rank", str(args.rank),
                         "--sketch-rank", str(args.sketch_rank), "--threads", str(args.threads))
            report["cells"].append(cell)
            print(f"{strategy:>9} n={n:<4} agg {cell['aggregation_s']:8.2f}s  gen {cell['generation_s']:7.2f}s  "
                  f"peak {cell['peak_rss_mib']:8.0f} MiB  result {cell['result_mib']:8.0f} MiB", flush=True)
    report["total_s"] = round(time.perf_counter() - started, 1)
    report["load_after"] = [round(x, 2) for x in os.getloadavg()]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(render(report))
    print(render(report))


if __name__ == "__main__":
    main()
