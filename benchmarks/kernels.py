"""Layer-level benchmark of the quantized LoRA linear against its baselines, in one run.

    python benchmarks/kernels.py                       # full matrix on a GPU, small shapes on CPU
    python benchmarks/kernels.py --shapes 4096x4096 --m 16 512 --formats nf4

Per (layer shape, M, format), forward and forward+backward (dX, dA, dB), r = 16:

* ``dense+lora``        F.linear(x, W) + s·(x·Aᵀ)·Bᵀ with a dense W in the activation dtype (eager)
* ``dense+lora:compile`` the same under ``torch.compile`` (GPU; on CPU only with ``--compile``)
* ``bnb4+peft``         bitsandbytes ``Linear4bit`` (NF4, double quant) wrapped by PEFT's LoRA layer
* ``deq+matmul``        decode W into a one-layer buffer, then cuBLAS (a custom autograd function)
* ``fedlora``           ``fedlora_kernels.quant_lora_linear``: fused Triton kernels on CUDA; on CPU
                        the torch reference (which *is* dequantise-then-matmul: no Triton on CPU)

Timing: warm-up, then the median of ≥ 100 runs timed with CUDA events with
the L2 cache flushed before each (GPU), or of ``--cpu-reps`` runs with ``perf_counter`` (CPU).
Reported: µs, TFLOP/s, and on a known GPU the % of the roofline lower bound (max of FLOPs/peak and
bytes/bandwidth, bytes = the weight as stored + activations). A baseline whose package is missing
or that cannot run on the device is recorded as skipped with the reason, never silently dropped.
Results go to ``benchmarks/results/kernels_<device>.json`` and ``.md`` with device and versions.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fedlora.config import QuantConfig
from fedlora.quant import quantize_weight
from fedlora_kernels import dequantize, quant_lora_linear

GEMMA_SHAPES = ["1024x640", "256x640", "640x1024", "2048x640", "640x2048"]  # (d_out x d_in) of Gemma 3 270M
# card name fragment → (dense bf16 TFLOP/s, HBM TB/s)
PEAKS = {"H100 PCIe": (756.0, 2.0), "H100": (989.0, 3.35), "H200": (989.0, 4.8), "A100": (312.0, 2.0)}


def _peaks(name: str) -> tuple[float, float] | None:
    for key, val in PEAKS.items():
        if key in name:
            return val
    return None


class DequantThenMatmul(torch.autograd.Function):
    """Baseline: W decoded into a temporary (one layer) in the activation dtype, then cuBLAS."""

    @staticmethod
    def forward(ctx, x, qweight, A, B, s):  # type: ignore[override]
        w = dequantize(qweight).to(x.dtype)  # (N, K) temporary
        xa = x @ A.t().to(x.dtype)
        ctx.save_for_backward(x, xa, A, B)
        ctx.qweight, ctx.s = qweight, s
        return F.linear(x, w) + s * (xa @ B.t().to(x.dtype))

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, xa, A, B = ctx.saved_tensors
        w = dequantize(ctx.qweight).to(dy.dtype)
        dyb = dy @ B.to(dy.dtype)
        dx = dy @ w + ctx.s * (dyb @ A.to(dy.dtype))
        return dx, None, (ctx.s * dyb.t() @ x).to(A.dtype), (ctx.s * dy.t() @ xa).to(B.dtype), None


def _time(fn, device: str, reps: int, flush: torch.Tensor | None) -> float:
    """Median seconds of ``fn()``."""
    for _ in range(3):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            if flush is not None:
                flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _methods(args, device: str, dtype: torch.dtype, N: int, K: int, fmt: str):
    """name → (callable(x, A, B) -> y) or a skip reason string."""
    g = torch.Generator().manual_seed(0)
    w = (0.02 * torch.randn(N, K, generator=g)).to(device)
    qcfg = QuantConfig(format=fmt, group_size=args.group_size)
    qweight = quantize_weight(w, qcfg)
    tables = qweight.tables(device)
    w_dense = w.to(dtype)
    s = 2.0

    def dense(x, A, B):
        return F.linear(x, w_dense) + s * ((x @ A.t().to(dtype)) @ B.t().to(dtype))

    out = {"dense+lora": dense}
    if device == "cuda" or args.compile:
        out["dense+lora:compile"] = torch.compile(dense)
    else:
        out["dense+lora:compile"] = "skipped on CPU (compile time dominates; pass --compile)"
    try:
        out["bnb4+peft"] = _bnb_peft(w, device, dtype, fmt, s)
    except Exception as err:  # a baseline that cannot be built is reported, not fatal
        out["bnb4+peft"] = f"failed to build: {type(err).__name__}: {err}"[:200]
    out["deq+matmul"] = lambda x, A, B: DequantThenMatmul.apply(x, qweight, A, B, s)
    out["fedlora"] = lambda x, A, B: quant_lora_linear(x, qweight, A, B, s, tables=tables)
    return out


def _bnb_peft(w: torch.Tensor, device: str, dtype: torch.dtype, fmt: str, s: float):
    if fmt != "nf4":
        return "bitsandbytes has no int4/3/2 group format to compare with"
    if device != "cuda":
        return "skipped on CPU (bitsandbytes' CPU 4-bit path is not what clients run)"
    try:
        import bitsandbytes as bnb
        from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit
    except ImportError as err:
        return f"not installed ({err.name})"
    base = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, compress_statistics=True, quant_type="nf4")
    base = base.to(device)
    layer = PeftLinear4bit(base, "default", r=16, lora_alpha=int(16 * s))
    layer.lora_B["default"].weight.data.normal_(0, 0.02)
    layer = layer.to(device)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight

    def run(x, _A, _B):
        return layer(x)

    run.params = (A, B)  # the layer's own factors get the gradients
    return run


def sweep(args) -> None:
    """Offline tile sweep of the fused kernels on this GPU (GPU time by ``triton.testing.do_bench``,
    L2 cleared each run): the winners are baked into ``quant_lora_triton.block_config`` by hand,
    and the fused-vs-decode+cuBLAS crossover into ``FUSED_MAX_M``. Stops at ``--deadline`` s."""
    import itertools

    from triton.testing import do_bench

    from fedlora_kernels import quant_lora_triton as tk

    t_end = time.time() + args.deadline
    N = K = 4096
    r, s, dt = args.rank, 2.0, torch.bfloat16
    g = torch.Generator().manual_seed(0)
    w = 0.02 * torch.randn(N, K, generator=g).cuda()
    rows = []

    def bench(fn):
        return do_bench(fn, warmup=10, rep=60, return_mode="median") * 1e3  # µs

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "sweep.json").write_text(json.dumps(rows, indent=0))

    qs = {fmt: quantize_weight(w, QuantConfig(format=fmt, group_size=args.group_size)) for fmt in args.formats}
    A = (torch.randn(r, K, generator=g) / K**0.5).cuda()
    B = (0.02 * torch.randn(N, r, generator=g)).cuda()
    W16 = w.to(dt)
    # 1. the deq kernel alone and the path crossover (fwd and dX, fused default vs decode + cuBLAS)
    for fmt, q in qs.items():
        tb = q.tables("cuda")
        for sel in (False, True) if fmt == "nf4" else (False,):
            emit({"what": "deq_bf16", "fmt": fmt, "SELECT": sel, "us": bench(lambda: tk.dequantize(q, tb, dt, sel))})
        for M in (16, 32, 64, 128, 256, 512):
            x = torch.randn(M, K, device="cuda", dtype=dt)
            dy = torch.randn(M, N, device="cuda", dtype=dt)
            row = {"what": "path", "fmt": fmt, "M": M}
            for fused in (True, False):
                row[f"fwd_{'fused' if fused else 'deq'}"] = bench(lambda: tk.forward(x, q, tb, A, B, s, fused=fused))
                row[f"dx_{'fused' if fused else 'deq'}"] = bench(lambda: tk.backward_dx(dy, q, tb, A, B, s, fused=fused))
            row["dense_fwd"] = bench(lambda: x @ W16.t())
            emit(row)
    # 2. tiles of the fused kernels at small M
    grid_f = list(itertools.product((16, 32, 64), (128, 256), (2, 4), (4,), (False, True)))
    grid_b = list(itertools.product((32, 64, 128), (128, 256), (3,), (4,), (False, True)))
    for M in (16, 64):
        for fmt, q in qs.items():
            tb = q.tables("cuda")
            x = torch.randn(M, K, device="cuda", dtype=dt)
            dy = torch.randn(M, N, device="cuda", dtype=dt)
            for kind, grid in (("fwd", grid_f), ("dx", grid_b)):
                for BN, BK, st, wp, sel in grid:
                    if sel and fmt != "nf4":
                        continue
                    if time.time() > t_end:
                        print("deadline reached", flush=True)
                        return
                    cfg = {"BM": max(16, M), "BN": BN, "BK": BK, "num_warps": wp, "num_stages": st, "SELECT": sel}
                    try:
                        if kind == "fwd":
                            us = bench(lambda: tk.forward(x, q, tb, A, B, s, config=cfg, fused=True))
                        else:
                            us = bench(lambda: tk.backward_dx(dy, q, tb, A, B, s, config=cfg, fused=True))
                    except Exception as err:
                        us = f"{type(err).__name__}: {err}"[:120]
                    emit({"what": kind, "fmt": fmt, "M": M, **cfg, "us": us})


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=None, help="d_outxd_in (default: 4096x4096 + Gemma's on GPU)")
    parser.add_argument("--m", nargs="*", type=int, default=None, help="token counts M")
    parser.add_argument("--formats", nargs="*", default=["nf4", "int4"])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--reps", type=int, default=100, help="timed runs per point on a GPU (≥ 100)")
    parser.add_argument("--cpu-reps", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile on CPU")
    parser.add_argument("--cpu-threads", type=int, default=1, help="torch threads on CPU (1: stable on a shared box)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--sweep", action="store_true", help="tile sweep of the fused kernels (GPU), then exit")
    parser.add_argument("--deadline", type=float, default=240.0, help="seconds the sweep may take")
    args = parser.parse_args()
    if args.sweep:
        return sweep(args)
    device = "cuda" if cuda else "cpu"
    if not cuda:
        torch.set_num_threads(args.cpu_threads)
    dtype = torch.bfloat16 if cuda else torch.float32  # CPU bf16 GEMMs are not what a CPU run would use
    shapes = args.shapes or (["4096x4096", *GEMMA_SHAPES] if cuda else ["512x512", "1024x640"])
    ms = args.m or ([16, 512, 4096, 16384] if cuda else [16, 128])
    reps = args.reps if cuda else args.cpu_reps
    flush = torch.empty(64 * 2**20, dtype=torch.int32, device="cuda") if cuda else None  # 256 MB > L2
    name = torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    peaks = _peaks(name) if cuda else None
    rows = []
    for shape in shapes:
        N, K = map(int, shape.split("x"))
        for fmt in args.formats:
            methods = _methods(args, device, dtype, N, K, fmt)
            for M in ms:
                g = torch.Generator().manual_seed(1)
                x = torch.randn(M, K, generator=g).to(device, dtype)
                A = (torch.randn(args.rank, K, generator=g) / K**0.5).to(device).requires_grad_()
                B = (0.02 * torch.randn(N, args.rank, generator=g)).to(device).requires_grad_()
                dy = torch.randn(M, N, generator=g).to(device, dtype)
                for method, fn in methods.items():
                    row = {"shape": shape, "format": fmt, "M": M, "method": method}
                    if isinstance(fn, str):
                        rows.append(row | {"skipped": fn})
                        print(json.dumps(rows[-1]), flush=True)
                        continue
                    params = getattr(fn, "params", (A, B))
                    xg = x.clone().requires_grad_()

                    def fwd():
                        with torch.no_grad():
                            fn(x, A, B)

                    def fwd_bwd():
                        y = fn(xg, A, B)
                        torch.autograd.grad(y, (xg, *params), dy)

                    try:
                        t_f = _time(fwd, device, reps, flush)
                        t_fb = _time(fwd_bwd, device, reps, flush)
                    except Exception as err:  # a baseline that fails here is reported, not fatal
                        rows.append(row | {"skipped": f"failed: {type(err).__name__}: {err}"[:200]})
                        print(json.dumps(rows[-1]), flush=True)
                        continue
                    flops_f = 2 * M * N * K + 2 * M * args.rank * (N + K)
                    flops_fb = 4 * M * N * K + 6 * M * args.rank * (N + K)
                    row |= {"fwd_us": round(t_f * 1e6, 1), "fwd_bwd_us": round(t_fb * 1e6, 1),
                            "fwd_tflops": round(flops_f / t_f / 1e12, 3), "fwd_bwd_tflops": round(flops_fb / t_fb / 1e12, 3)}  # fmt: skip
                    if peaks:
                        tflops, tbs = peaks
                        wbytes = (0.516 if method in ("fedlora", "bnb4+peft", "deq+matmul") else 2.0) * N * K
                        act = 2 * M * (N + K)
                        bound_f = max(flops_f / (tflops * 1e12), (wbytes + act) / (tbs * 1e12))
                        bound_fb = max(flops_fb / (tflops * 1e12), (2 * wbytes + 3 * act) / (tbs * 1e12))
                        row |= {"fwd_roofline_pct": round(100 * bound_f / t_f, 1), "fwd_bwd_roofline_pct": round(100 * bound_fb / t_fb, 1)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            _write(args, name, device, dtype, rows)  # after each (shape, format): a cut run keeps its rows
    print(_markdown(_write(args, name, device, dtype, rows), rows))


def _write(args, name: str, device: str, dtype: torch.dtype, rows: list[dict]) -> dict:
    meta = _meta(name, device, dtype, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "cuda_" + name.replace(" ", "_") if device == "cuda" else "cpu"
    (out / f"kernels_{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / f"kernels_{tag}.md").write_text(_markdown(meta, rows))
    return meta


def _meta(name: str, device: str, dtype: torch.dtype, args) -> dict:
    meta = {"device": name, "dtype": str(dtype).removeprefix("torch."), "rank": args.rank, "group_size": args.group_size,
            "torch": torch.__version__, "python": platform.python_version(), "when": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
    for pkg in ("triton", "bitsandbytes", "peft"):
        try:
            meta[pkg] = __import__(pkg).__version__
        except ImportError:
            meta[pkg] = None
    if device == "cuda":
        meta["driver"] = torch.version.cuda
        meta["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    else:
        meta["note"] = "CPU run: no GPU this session; 'fedlora' is the torch reference path here, not Triton"
    return meta


def _markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# Kernel benchmark — {meta['device']}", "", "```", json.dumps(meta), "```", "",
             "| shape | format | M | method | fwd µs | fwd+bwd µs | fwd TFLOP/s | fwd+bwd TFLOP/s | fwd % roof | f+b % roof |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['shape']} | {r['format']} | {r['M']} | {r['method']} | skipped: {r['skipped']} |||||")
            continue
        lines.append(f"| {r['shape']} | {r['format']} | {r['M']} | {r['method']} | {r['fwd_us']} | {r['fwd_bwd_us']} | "
                     f"{r['fwd_tflops']} | {r['fwd_bwd_tflops']} | {r.get('fwd_roofline_pct', '')} | {r.get('fwd_bwd_roofline_pct', '')} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
