"""Server-side aggregation cost per strategy on Llama-2-7B-shaped adapters, through the server's
own reply path.

    python benchmarks/aggregation.py            # 32 blocks, 10 and 100 clients
    python benchmarks/aggregation.py --quick    # 2 blocks: a fast check
    python benchmarks/aggregation.py --blocks 1 --modules q_proj --clients 4,32   # ~8 min on 2 shared cores

Shapes: per block q, k, v, o (4096×4096), gate, up (11008×4096) and down (4096×11008), as
(d_out × d_in); rank 16, fp32: 152 MiB of factors per client for 32 blocks. Every
(strategy, clients) cell runs in a fresh subprocess, whose peak RSS (``ru_maxrss``) is its memory
high-water mark; tracemalloc does not see torch tensors.

Every strategy is measured the same way, with no per-method branch: the path ``run_round`` in
``server/loop.py`` takes. ``make_strategy(cfg)``, ``strategy.initial_state(adapter, min_rank=r)``
from a fresh rank-r server adapter (A seeded, B = 0), ``strategy.start_for(state, r)``, then a
``Round(strategy, state)``. Client i's reply is generated as it "arrives": each part the method
declares to travel (``METHOD.parts``) is drawn fresh (seeded per client and layer), the rest is
the start it was sent; it is serialised with ``reply_content`` (as a client does), handed to
``Round.take`` (size check, reply check, parse, the method's aggregate, the ΔW* reference) and
dropped. After the last reply: ``round.aggregate.finish()`` and ``round.ideal.result()``.
The aggregation error (``round_update`` against ΔW*) that ``run_round`` computes next is not
included. lorafair's sketch rank is put in the state's extras (``lorafair_sketch_rank``; there is
no config key), which the other methods ignore.

What the server holds therefore includes ``Round.ideal`` (``IdealAccumulator``): one dense
float64 d_out×d_in sum per layer for the ΔW* reference, whatever the method. Buffered methods
(fedex, flora: ``METHOD.aggregation`` is ``Buffered``) keep every reply until ``finish``, as the
server does. Besides peak RSS, each cell reports the tensor bytes the round's aggregate and its
ΔW* reference hold after the last reply (each storage once; the round's start state excluded).

Wall time: ``take`` counts the whole reply path (check, parse, aggregate, ΔW*); the aggregate's
and the reference's own ``add`` are timed inside it; generating and serialising the synthetic
replies is timed apart.

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
from fedlora.aggregation import METHODS  # noqa: E402
from fedlora.aggregation import terms  # noqa: E402
from fedlora.config import config_from_dict  # noqa: E402
from fedlora.memory import tensor_bytes  # noqa: E402
from fedlora.protocol.messages import content_bytes, reply_content  # noqa: E402
from fedlora_server.loop import Round  # noqa: E402
from fedlora_server.strategy import make_strategy  # noqa: E402

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
ALPHA = 32.0


def layers(blocks: int, modules: list[str] | None = None) -> list[tuple[str, int, int]]:
    """The adapted layers: ``modules`` (short names, e.g. ``q_proj``; default all seven) of each block."""
    chosen = [(name, d_out, d_in) for name, d_out, d_in in BLOCK
              if modules is None or name.rsplit(".", 1)[-1] in modules]
    return [(f"model.layers.{b}.{name}", d_out, d_in) for b in range(blocks) for name, d_out, d_in in chosen]


def _gen(client: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(1_000_003 * (client + 1) + index)


def fresh(shape: tuple[int, ...], g: torch.Generator, *, row: bool) -> torch.Tensor:
    """A trained factor of ``shape``: A-like (``row``: r × d_in) uniform ±d_in^-½, B-like ±0.01."""
    bound = shape[1] ** -0.5 if row else 0.01
    return torch.empty(shape).uniform_(-bound, bound, generator=g)


def server_adapter(spec: list[tuple[str, int, int]], rank: int) -> dict[str, LoraFactors]:
    """The server model's freshly initialised rank-``rank`` adapter: A seeded, B = 0."""
    out = {}
    for j, (name, d_out, d_in) in enumerate(spec):
        out[name] = LoraFactors(fresh((rank, d_in), _gen(-1, j), row=True), torch.zeros(d_out, rank), ALPHA / rank)
    return out


def client_update(start: dict[str, LoraFactors], parts: tuple[str, ...], client: int) -> dict[str, LoraFactors]:
    """What client ``client`` sends back from ``start``: every part that travels drawn fresh (a
    core R is the ``A`` field of ``LoraFactors(A=R, B=I)``), the rest as it was sent."""
    out = {}
    for j, (name, f) in enumerate(start.items()):
        g = _gen(client, j)
        A = fresh(tuple(f.A.shape), g, row=True) if {"A", "R"} & set(parts) else f.A
        B = fresh(tuple(f.B.shape), g, row=False) if "B" in parts else f.B
        out[name] = LoraFactors(A, B, f.scale)
    return out


# ---------------------------------------------------------------------------------------------
# One cell, in its own process


def run_cell(strategy_name: str, n: int, blocks: int, rank: int, sketch_rank: int,
             modules: list[str] | None = None) -> dict:
    spec = layers(blocks, modules)
    cfg = config_from_dict({"strategy": {"name": strategy_name}, "adapter": {"rank": rank, "alpha": ALPHA}})
    strategy = make_strategy(cfg)
    state = strategy.initial_state(server_adapter(spec, rank), min_rank=rank)
    state.extras["lorafair_sketch_rank"] = sketch_rank
    start = strategy.start_for(state, rank)
    rnd = Round(strategy, state)
    times = {"take": 0.0, "aggregate_add": 0.0, "ideal_add": 0.0, "finish": 0.0, "ideal_result": 0.0,
             "generation": 0.0}

    def timed(key, fn):
        def wrapper(*args):
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                times[key] += time.perf_counter() - t0
        return wrapper

    # instrumentation only: the same objects' own methods, timed
    rnd.aggregate.add = timed("aggregate_add", rnd.aggregate.add)
    rnd.ideal.add = timed("ideal_add", rnd.ideal.add)
    take = timed("take", rnd.take)
    reply_sizes = 0
    for i in range(n):  # one reply at a time, dropped after take
        t0 = time.perf_counter()
        content = reply_content(client_update(start, strategy.parts, i),
                                {"num-examples": 1 + i % 7, "train_loss": 1.0}, strategy.parts)
        size = content_bytes(content)
        times["generation"] += time.perf_counter() - t0
        if not take(content, start, size, f"client {i}"):
            raise SystemExit(f"{strategy_name}: reply {i} rejected: {rnd.rejected[-1]}")
        reply_sizes += size
        del content
    base = set()
    tensor_bytes(state, base)  # the round's start: there before any reply
    tensor_bytes(start, base)
    aggregate_held = tensor_bytes(rnd.aggregate, set(base))
    ideal_held = tensor_bytes(rnd.ideal, set(base))
    new_state = timed("finish", rnd.aggregate.finish)()
    reference = timed("ideal_result", rnd.ideal.result)()
    result_bytes = sum(terms.term_nbytes(f) for f in new_state.adapter.values())
    result_bytes += sum(terms.term_nbytes(t) for ts in new_state.base_terms.values() for t in ts)
    del reference
    return {
        "strategy": strategy_name,
        "streams": METHODS[strategy_name].streams,
        "clients": n,
        "layers": len(spec),
        "accepted": rnd.accepted,
        "reply_mib": round(reply_sizes / n / 2**20, 2),
        "aggregation_s": round(times["take"] + times["finish"] + times["ideal_result"], 3),
        "take_s": round(times["take"], 3),
        "aggregate_add_s": round(times["aggregate_add"], 3),
        "ideal_add_s": round(times["ideal_add"], 3),
        "finish_s": round(times["finish"], 3),
        "ideal_result_s": round(times["ideal_result"], 3),
        "generation_s": round(times["generation"], 3),
        "aggregate_held_mib": round(aggregate_held / 2**20, 3),
        "ideal_held_mib": round(ideal_held / 2**20, 1),
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
    idle = report["idle_rss_mib"]
    lo_n, hi_n = min(cfg["clients"]), max(cfg["clients"])
    shapes = {name.rsplit(".", 1)[-1]: f"{d_out}×{d_in}" for name, d_out, d_in in BLOCK}
    full = len(cfg["modules"]) == len(BLOCK)
    adapted = ("q, k, v, o 4096×4096; gate, up 11008×4096; down 4096×11008" if full
               else "; ".join(f"{m} {shapes[m]}" for m in cfg["modules"]))
    per_full_gib = 8 * sum(d_out * d_in for _, d_out, d_in in BLOCK) * 32 / 2**30
    lines = [
        "# Aggregation cost per strategy (Llama-2-7B-shaped adapters, server reply path)",
        "",
        f"Generated by `{report['command']}` on {report['date']} ({report['total_s']:.0f} s in all).",
        "",
        "**Every method, fedavg included, runs through the server's own reply path**, with no per-method "
        "branch in the benchmark: `make_strategy(cfg)` → `strategy.initial_state` → `strategy.start_for` → "
        "`Round(strategy, state)` → `Round.take(content, start, size, who)` per reply (size check, reply check, "
        "parse, the method's aggregate, the ΔW* reference) → `round.aggregate.finish()` and "
        "`round.ideal.result()`. Each reply is generated (the parts `METHOD.parts` says travel, drawn fresh), "
        "serialised with `reply_content`, taken, and dropped before the next one is made, as a server receives "
        "them. The aggregation error `run_round` computes afterwards is not included.",
        "",
        f"- Adapters: {cfg['blocks']} block{'s' if cfg['blocks'] != 1 else ''} × ({adapted}), {cfg['layers']} "
        f"layer{'s' if cfg['layers'] != 1 else ''}, rank {cfg['rank']}, fp32: {cfg['client_mib']:.1f} MiB of factors per client"
        + ("" if cfg["blocks"] == 32 and full else
           " (**reduced from Llama-2-7B's 32 blocks × 7 projections** to fit this machine's time and memory)")
        + ".",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, torch {m['torch']} "
        f"({m['torch_threads']} thread{'s' if m['torch_threads'] != 1 else ''} per cell), Python {m['python']}.",
        f"- The CPU is **shared with other engineers' processes**: load average {report['load_before']} before, "
        f"{report['load_after']} after. Wall times are indicative, not a clean-room measurement.",
        f"- Peak RSS is each cell's own process high-water mark (`ru_maxrss`); an idle process that imports "
        f"fedlora, the server loop and torch peaks at {idle} MiB. \"held\" columns: tensor bytes reachable from "
        "`round.aggregate` (the method's running sums, or the buffered replies) and from `round.ideal` (the ΔW* "
        "reference) after the last reply, before `finish`; the round's start state is not counted.",
        "- Wall time: `take` is the whole reply path; `agg add` and `ΔW* add` are the method's and the "
        "reference's own `add` inside it; `finish` includes `round.ideal.result()`. Generating and serialising "
        "the synthetic replies is not counted.",
        "- Peak RSS of two cells can differ by up to ~100 MiB for reasons unrelated to the client count: glibc's "
        "dynamic mmap threshold makes heap reuse depend on allocation history (run the cells with "
        "`MALLOC_MMAP_THRESHOLD_=131072` to pin it, at some cost in page faults).",
        f"- lorafair accumulates T = ΔW* as a rank-{cfg['sketch_rank']} sketch (`lorafair_sketch_rank` in the "
        f"state's extras; exact while n·r ≤ {cfg['sketch_rank']}). No config key sets it, so a real server run "
        "of lorafair accumulates T dense: one more float64 d_out×d_in per layer, as large as the ΔW* reference.",
        f"- **The ΔW* reference dominates memory.** `IdealAccumulator` (server/strategy.py) keeps one dense "
        f"float64 d_out×d_in sum per layer for every method: {cfg['dense_T_gib'] * 1024:.0f} MiB at this size "
        f"({per_full_gib:.0f} GiB for the full 32 × 7 layers, more than this machine's RAM), and `result()` makes a "
        "second copy of it; adding one reply to it builds dense float64 temporaries of each layer. That is a known, separate issue; "
        "the methods' own state is the \"agg held\" column. Its `add` is also nearly all of `take`'s time.",
        "- fedex / flora are `Buffered`: the server keeps every reply until `finish`, so their held bytes grow "
        "with n by construction, and their merged base terms (in the result column) are O(n) too.",
        "",
        "| strategy | streams | clients | take (s) | agg add (s) | ΔW* add (s) | finish (s) | peak RSS (MiB) | "
        "over idle (MiB) | agg held (MiB) | ΔW* held (MiB) | result (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["cells"]:
        lines.append(
            f"| {r['strategy']} | {'yes' if r['streams'] else 'buffered'} | {r['clients']} | {r['take_s']:.2f} | "
            f"{r['aggregate_add_s']:.2f} | {r['ideal_add_s']:.2f} | {r['finish_s'] + r['ideal_result_s']:.2f} | "
            f"{r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] - idle:.0f} | {r['aggregate_held_mib']:.3f} | "
            f"{r['ideal_held_mib']:.0f} | {r['result_mib']:.1f} |"
        )
    lines += ["", f"{hi_n} clients ÷ {lo_n} clients: peak RSS over idle; the method's held bytes:", ""]
    for s in cfg["strategies"]:
        cells = {r["clients"]: r for r in report["cells"] if r["strategy"] == s}
        if lo_n in cells and hi_n in cells and lo_n != hi_n:
            lo, hi = cells[lo_n], cells[hi_n]
            rss = (hi["peak_rss_mib"] - idle) / max(lo["peak_rss_mib"] - idle, 1e-9)
            held = (f"{hi['aggregate_held_mib'] / lo['aggregate_held_mib']:.2f}×" if lo["aggregate_held_mib"]
                    else "—")
            lines.append(f"- {s}: {rss:.2f}× ({lo['peak_rss_mib']:.0f} → {hi['peak_rss_mib']:.0f} MiB); "
                         f"held {held} ({lo['aggregate_held_mib']:.3f} → {hi['aggregate_held_mib']:.3f} MiB)")
    if report.get("summary"):
        lines += ["", report["summary"]]
    return "\n".join(lines) + "\n"


def summary(report: dict) -> str:
    """One sentence on fedavg's flatness in the number of clients, from the numbers."""
    cells = {r["clients"]: r for r in report["cells"] if r["strategy"] == "fedavg"}
    if len(cells) < 2:
        return ""
    lo, hi = cells[min(cells)], cells[max(cells)]
    idle = report["idle_rss_mib"]
    drss = hi["peak_rss_mib"] - lo["peak_rss_mib"]
    flat_held = hi["aggregate_held_mib"] == lo["aggregate_held_mib"]
    flat_rss = abs(drss) <= max(100.0, 0.05 * (lo["peak_rss_mib"] - idle))
    verdict = "flat" if flat_held and flat_rss else "**not flat**"
    return (f"fedavg's memory on the server path is {verdict} in the number of clients: peak RSS "
            f"{lo['peak_rss_mib']:.0f} MiB with {lo['clients']} clients and {hi['peak_rss_mib']:.0f} MiB with "
            f"{hi['clients']} ({drss:+.0f} MiB), and its aggregate holds {lo['aggregate_held_mib']:.3f} → "
            f"{hi['aggregate_held_mib']:.3f} MiB of tensors. Of its {lo['peak_rss_mib'] - idle:.0f} MiB over idle, "
            f"about 3 × {lo['ideal_held_mib']:.0f} = {3 * lo['ideal_held_mib']:.0f} MiB is the ΔW* reference "
            "(`IdealAccumulator`: its dense float64 sum, plus two dense float64 temporaries of a layer while each "
            "reply is added, `weight * f.delta(float64)` and the new sum), which dominates; fedavg's own running "
            f"sums are {hi['aggregate_held_mib']:.1f} MiB.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 blocks instead of 32")
    ap.add_argument("--blocks", type=int, default=None, help="transformer blocks (default 32, --quick 2)")
    ap.add_argument("--clients", default="10,100")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--sketch-rank", type=int, default=64)
    ap.add_argument("--modules", default=",".join(name.rsplit(".", 1)[-1] for name, _, _ in BLOCK),
                    help="projections adapted in each block (default all seven), e.g. q_proj,down_proj")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per cell (1: on a CPU shared with others, 2 threads oversubscribe it)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "aggregation"))
    ap.add_argument("--cell", nargs=2, metavar=("STRATEGY", "CLIENTS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    blocks = args.blocks or (2 if args.quick else 32)
    modules = args.modules.split(",")
    known = [name.rsplit(".", 1)[-1] for name, _, _ in BLOCK]
    if not modules or set(modules) - set(known):
        raise SystemExit(f"--modules {args.modules!r}: choose from {','.join(known)}")
    if args.cell:  # a child process: one measurement ("idle": imports only, the table's zero)
        torch.set_num_threads(args.threads)
        strategy, n = args.cell[0], int(args.cell[1])
        idle = {"peak_rss_mib": peak_rss_mib()}
        print(json.dumps(idle if strategy == "idle" else run_cell(strategy, n, blocks, args.rank, args.sketch_rank, modules)))
        return

    strategies = args.strategies.split(",")
    unknown = sorted(set(strategies) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}; choose from {', '.join(METHODS)}")
    clients = [int(c) for c in args.clients.split(",")]
    report = {
        "command": " ".join(["python benchmarks/aggregation.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "path": "make_strategy -> initial_state -> start_for -> Round.take per reply -> aggregate.finish, ideal.result",
        "machine": {**machine(), "torch_threads": args.threads},
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "idle_rss_mib": child("idle", "0")["peak_rss_mib"],
        "config": {
            "blocks": blocks,
            "modules": modules,
            "layers": len(layers(blocks, modules)),
            "rank": args.rank,
            "sketch_rank": args.sketch_rank,
            "strategies": strategies,
            "clients": clients,
            "client_mib": 4 * args.rank * sum(d_out + d_in for _, d_out, d_in in layers(blocks, modules)) / 2**20,
            "dense_T_gib": 8 * sum(d_out * d_in for _, d_out, d_in in layers(blocks, modules)) / 2**30,
        },
        "cells": [],
    }
    started = time.perf_counter()
    for strategy in strategies:
        for n in clients:
            cell = child(strategy, str(n), "--blocks", str(blocks), "--rank", str(args.rank),
                         "--sketch-rank", str(args.sketch_rank), "--modules", args.modules, "--threads", str(args.threads))
            report["cells"].append(cell)
            print(f"{strategy:>9} n={n:<4} take {cell['take_s']:7.2f}s (agg {cell['aggregate_add_s']:6.2f}s, "
                  f"ΔW* {cell['ideal_add_s']:6.2f}s)  finish {cell['finish_s'] + cell['ideal_result_s']:6.2f}s  "
                  f"gen {cell['generation_s']:6.2f}s  peak {cell['peak_rss_mib']:7.0f} MiB  "
                  f"held {cell['aggregate_held_mib']:7.1f} MiB  result {cell['result_mib']:7.1f} MiB", flush=True)
    report["total_s"] = round(time.perf_counter() - started, 1)
    report["load_after"] = [round(x, 2) for x in os.getloadavg()]
    report["summary"] = summary(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(render(report))
    print(render(report))


if __name__ == "__main__":
    main()
