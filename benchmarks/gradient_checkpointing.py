"""Activation memory of one training step with and without ``train.gradient_checkpointing``.

    python benchmarks/gradient_checkpointing.py              # seq 1024, batch 1, plain and DP
    python benchmarks/gradient_checkpointing.py --seq 512 --layers 6

The model: Gemma 3 270M's exact shape (hidden 640, MLP 2048, 4 query heads / 1 KV head of dim
256, 18 decoder layers, sliding window 512 on 5 of every 6 layers, vocab 262144, tied head) with
random weights (seeded), fp32 on CPU, LoRA rank 8 on ``all-linear`` (the defaults). One example
of ``--seq`` tokens, the second half supervised (a response), batch 1.

Each (mode, checkpointing) cell runs in a fresh subprocess: build the model and adapters, run one
step (forward + backward: ``response_loss`` for ``plain``; ``per_example_losses`` under a
``GradSampleCollector`` forming the exact per-example gradients for ``dp``), then reset the
kernel's high-water mark (``/proc/self/clear_refs``, after ``malloc_trim``; glibc's mmap threshold is
pinned at 64 KiB, so freed tensors leave the resident set instead of being reused unseen), run a second, measured step and report the
peak resident set (``VmHWM``) minus the resident set before it: the memory one step takes at its
high-water mark — activations saved for the backward, the backward's transients and the adapter
gradients — on top of the model. RSS is per process, so figures hold on a shared machine; wall
times depend on the load. Writes ``benchmarks/results/gradient_checkpointing_cpu.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIB = 2**20


def gemma3_270m_config(layers: int):
    from transformers import Gemma3TextConfig

    pattern = ["sliding_attention"] * 5 + ["full_attention"]
    return Gemma3TextConfig(
        vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
        layer_types=[pattern[i % 6] for i in range(layers)], max_position_embeddings=32768,
        rope_theta=1_000_000.0, query_pre_attn_scalar=256, rms_norm_eps=1e-6, tie_word_embeddings=True,
        final_logit_softcapping=None, attn_logit_softcapping=None, pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )  # fmt: skip


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_cell(mode: str, checkpointing: bool, seq: int, layers: int) -> dict:
    """One cell, in this process: returns the measured step's peak extra memory (MiB) and time."""
    from transformers import Gemma3ForCausalLM

    from fedlora.adapters import LoRALinear, inject_adapters, trainable_parameters
    from fedlora.config import AdapterConfig
    from fedlora.privacy.dp_training import per_example_losses
    from fedlora.privacy.grad_samplers import GradSampleCollector
    from fedlora.training.local import activation_checkpointing
    from fedlora.training.loss import response_loss

    torch.manual_seed(0)
    model = Gemma3ForCausalLM(gemma3_270m_config(layers))
    model.requires_grad_(False)
    inject_adapters(model, AdapterConfig(), LoRALinear)
    params = trainable_parameters(model)
    with torch.no_grad():
        for p in params:
            if p.abs().max() == 0:
                p.normal_(0, 0.01)  # B = 0 at init would leave A's gradient zero
    ids = torch.randint(3, 262144, (1, seq), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    model.train()

    def step() -> float:
        for p in params:
            p.grad = None
        if mode == "plain":
            summed, n = response_loss(model, batch)
            (summed / n).backward()
            return float(sum(p.grad.pow(2).sum() for p in params))
        with GradSampleCollector(model) as collector:
            per_example_losses(model, batch)[0].sum().backward()
            return float(sum(g.pow(2).sum() for g in collector.grads.values()))

    with activation_checkpointing(model, checkpointing):
        step()  # warm-up: one-time allocations
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand what the warm-up freed back, so the step cannot reuse it unseen
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _rss_kib("VmRSS")
        start = time.perf_counter()
        grad_sq = step()
        seconds = time.perf_counter() - start
        peak = _rss_kib("VmHWM")
    return {"mode": mode, "checkpointing": checkpointing, "seq": seq, "layers": layers,
            "step_peak_mib": (peak - before) / 1024, "model_rss_mib": before / 1024, "seconds": seconds,
            "grad_sq_norm": grad_sq}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--modes", nargs="+", default=["plain", "dp"], choices=["plain", "dp"])
    ap.add_argument("--cell", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cell:
        mode, ckpt = args.cell.split(":")
        print(json.dumps(run_cell(mode, ckpt == "on", args.seq, args.layers)))
        return
    rows = []
    for mode in args.modes:
        for ckpt in ("off", "on"):
            out = subprocess.run([sys.executable, __file__, "--cell", f"{mode}:{ckpt}", "--seq", str(args.seq),
                                  "--layers", str(args.layers)], capture_output=True, text=True, check=True,
                                 env=dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**16)))  # fmt: skip
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    results = ROOT / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    (results / "gradient_checkpointing_cpu.json").write_text(json.dumps(rows, indent=1) + "\n")
    cmd = "python benchmarks/gradient_checkpointing.py" + (
        f" --seq {args.seq}" if args.seq != 1024 else "") + (f" --layers {args.layers}" if args.layers != 18 else "")
    lines = [
        "# Gradient checkpointing: activation memory of one training step (CPU)",
        "",
        f"`{cmd}` — {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads.",
        "",
        f"Gemma 3 270M's shape ({args.layers} decoder layers, hidden 640, vocab 262144), random weights, fp32, "
        f"LoRA r=8 on all-linear; one example of {args.seq} tokens (second half supervised), batch 1. "
        "Peak = the step's resident-set high-water mark minus the resident set before it (activations, "
        "backward transients, adapter gradients), in a fresh process per row, after one warm-up step.",
        "",
        "| mode | checkpointing | step peak (MiB) | saving | step time (s) | ‖grad‖² |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        off = next(x for x in rows if x["mode"] == r["mode"] and not x["checkpointing"])
        saving = "" if not r["checkpointing"] else f"{1 - r['step_peak_mib'] / off['step_peak_mib']:.0%}"
        lines.append(f"| {r['mode']} | {'on' if r['checkpointing'] else 'off'} | {r['step_peak_mib']:.0f} | {saving} "
                     f"| {r['seconds']:.1f} | {r['grad_sq_norm']:.6g} |")  # fmt: skip
    lines += ["", "Model resident set before the step: "
              + ", ".join(f"{r['mode']}/{'on' if r['checkpointing'] else 'off'} {r['model_rss_mib']:.0f} MiB" for r in rows)
              + ". ‖grad‖² (plain: the batch gradient; dp: Σ of the per-example gradients' squares) is equal with "
              "and without checkpointing: the same gradients, recomputed.", "",
              "Step times are wall times on a machine shared with other work: compare the memory, not the "
              "times (checkpointing adds one forward of the decoder layers to each step).", ""]  # fmt: skip
    (results / "gradient_checkpointing_cpu.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
