"""Fused quantized-LoRA kernels vs the pure-torch reference: forward and every gradient, odd shapes.

Without a GPU the Triton kernels run under the Triton interpreter on CPU (fp16/fp32 only: the
interpreter's bf16 is wrong, docs/quantization.md). Triton decides interpretation when a kernel is
*decorated*, i.e. when ``fedlora_kernels.quant_lora_triton`` is first imported — so this module
sets ``TRITON_INTERPRET=1`` before any test imports it (it does not matter that torch or
transformers may already have imported ``triton`` itself). Nothing else in the suite imports the
kernel module on a CPU machine: CPU dispatch always takes the reference. On a GPU the variable is
left alone and the same tests run compiled, plus the bf16 and larger-shape tests.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from fedlora.quant import Int8Weight, IntKWeight, NF4Weight  # noqa: E402
from fedlora_kernels import quant_lora_triton as tk  # noqa: E402  (after TRITON_INTERPRET)
from fedlora_kernels.quant_lora import KernelUnavailableError, quant_lora_linear  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (bf16 is wrong under the Triton interpreter)")

# The one tolerance table of the suite: relative Frobenius error ‖kernel − reference‖/‖reference‖
# of the output and of each gradient, per activation dtype. fp32 runs the GEMMs in IEEE fp32; fp16
# and bf16 round the decoded weight (as the reference does) and accumulate in fp32 — the budget
# is the dtype's unit roundoff times a small factor, and 1e-2 for bf16 (docs/quantization.md).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


FORMATS = {
    "nf4": lambda w, g: NF4Weight.quantize(w),
    "nf4-fp32-absmax": lambda w, g: NF4Weight.quantize(w, double_quant=False),
    "int8": lambda w, g: Int8Weight.quantize(w),
    "int4": lambda w, g: IntKWeight.quantize(w, bits=4, group_size=g),
    "int3": lambda w, g: IntKWeight.quantize(w, bits=3, group_size=g),
    "int2": lambda w, g: IntKWeight.quantize(w, bits=2, group_size=g),
}


def _quantized(fmt: str, w: torch.Tensor, group: int = 32):
    """``w`` packed in ``fmt``, on the test device."""
    q = FORMATS[fmt](w, group)
    return q.with_tensors({k: v.to(DEVICE) for k, v in q.tensors().items()})


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _compare(qweight, dtype: torch.dtype, M: int, r: int, *, lead: tuple[int, ...] = (), seed: int = 0) -> dict:
    """Forward + (dX, dA, dB) of the Triton op and the reference on the same inputs."""
    N, K = qweight.shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, M, K, generator=g).to(DEVICE, dtype)
    A = (0.1 * torch.randn(r, K, generator=g)).to(DEVICE)
    B = (0.1 * torch.randn(N, r, generator=g)).to(DEVICE)
    dy = torch.randn(*lead, M, N, generator=g).to(DEVICE, dtype)
    results = {}
    for backend in ("reference", "triton"):
        xi, Ai, Bi = (t.clone().requires_grad_() for t in (x, A, B))
        y = quant_lora_linear(xi, qweight, Ai, Bi, 1.7, backend=backend)
        results[backend] = (y, *torch.autograd.grad(y, (xi, Ai, Bi), dy))
    return {name: _rel(t, ref) for name, t, ref in zip(("y", "dx", "dA", "dB"), results["triton"], results["reference"])}


# (M, N, K, r): odd M and r, N not a tile multiple, K not a multiple of NF4's 64-value block
# (for NF4; the int formats get K divisible by their group of 32).
SHAPES = [(19, 48, 96, 5), (33, 80, 160, 16)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fmt", ["nf4", "nf4-fp32-absmax", "int8", "int4", "int3", "int2"])
def test_forward_and_grads_match_reference(fmt, shape, dtype):
    # Prepare
    M, N, K, r = shape
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(1)) * 0.05
    qweight = _quantized(fmt, w)
    # Execute
    errors = _compare(qweight, dtype, M, r)
    # Assert
    assert max(errors.values()) <= TOLERANCE[dtype], errors


@pytest.mark.parametrize("fmt", ["nf4", "int8", "int4", "int3"])
def test_three_d_input_and_no_adapter(fmt):
    N, K = 40, 64
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(2))
    q = _quantized(fmt, w)
    errors = _compare(q, torch.float32, 7, 3, lead=(2,))
    assert max(errors.values()) <= TOLERANCE[torch.float32], errors
    x = torch.randn(2, 5, K, device=DEVICE, requires_grad=True)
    y_t = quant_lora_linear(x, q, backend="triton")
    y_r = quant_lora_linear(x, q, backend="reference")
    assert y_t.shape == (2, 5, N)
    assert _rel(y_t, y_r) <= TOLERANCE[torch.float32]
    (dx,) = torch.autograd.grad(y_t.sum(), x)
    assert _rel(dx, torch.ones(2, 5, N, device=DEVICE) @ q.dequantize()) <= 1e-5


def test_frozen_A_gets_no_gradient_and_weight_never_does():
    N, K, r = 48, 64, 4
    q = _quantized("nf4", torch.randn(N, K))
    x = torch.randn(9, K, device=DEVICE, requires_grad=True)
    A = torch.randn(r, K, device=DEVICE)  # frozen (FFA-LoRA)
    B = torch.randn(N, r, device=DEVICE, requires_grad=True)
    y = quant_lora_linear(x, q, A, B, 2.0, backend="triton")
    y.sum().backward()
    assert A.grad is None and B.grad is not None and x.grad is not None
    assert all(not t.requires_grad and t.grad is None for t in q.tensors().values())
    expected_dB = 2.0 * torch.ones(N, 9, device=DEVICE) @ (x.detach() @ A.t())
    assert _rel(B.grad, expected_dB) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("fmt", ["nf4", "int4", "int8"])
def test_large_m_path_decode_then_gemm_matches_reference(fmt, dtype, monkeypatch):
    # Prepare: every M takes the large-M path (one-layer decode in the activation dtype, then a GEMM)
    monkeypatch.setattr(tk, "FUSED_MAX_M", 0)
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(6)) * 0.05
    q = _quantized(fmt, w)
    # Execute
    errors = _compare(q, dtype, 21, 5)
    # Assert
    assert max(errors.values()) <= TOLERANCE[dtype], errors


@pytest.mark.parametrize("fmt", ["nf4", "nf4-fp32-absmax", "int8", "int4", "int3", "int2"])
def test_kernel_dequantisation_is_bit_exact(fmt):
    # Odd shapes: 37 rows, and for NF4 a row length (72) that makes 64-value blocks straddle rows
    # (the per-element decode); 128 columns take the aligned decode (whole groups per tile).
    for K in (72 if fmt.startswith("nf4") else 96, 128):
        w = torch.randn(37, K, generator=torch.Generator().manual_seed(3))
        q = _quantized(fmt, w)
        ref = q.dequantize()
        assert torch.equal(tk.dequantize(q, q.tables(DEVICE)), ref)
        # the large-M path's temporary: rounded once to the activation dtype, as the reference rounds
        assert torch.equal(tk.dequantize(q, q.tables(DEVICE), torch.float16), ref.to(torch.float16))
        if fmt.startswith("nf4"):  # levels by the register select tree instead of the table lookup
            assert torch.equal(tk.dequantize(q, q.tables(DEVICE), select=True), ref)


def test_forced_triton_on_plain_cpu_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = NF4Weight.quantize(torch.randn(16, 64))
    with pytest.raises(KernelUnavailableError, match="need CUDA"):
        quant_lora_linear(torch.randn(2, 64), q, backend="triton")
    # auto quietly takes the reference on CPU
    assert quant_lora_linear(torch.randn(2, 64), q).shape == (2, 16)


# --- GPU only: bf16 and realistic shapes (compiled kernels) ---------------------------------------


@gpu_only
@pytest.mark.parametrize("fmt", ["nf4", "int8", "int4", "int3", "int2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("path", ["auto", "fused"])
def test_gpu_forward_and_grads_match_reference(fmt, dtype, path, monkeypatch):
    if path == "fused":  # the fused kernels at every M (auto: decode + cuBLAS above FUSED_MAX_M)
        monkeypatch.setattr(tk, "FUSED_MAX_M", 1 << 30)
    w = torch.randn(1024, 768, generator=torch.Generator().manual_seed(4)) * 0.02
    q = _quantized(fmt, w, 64)
    for M in (16, 40, 100, 515):
        errors = _compare(q, dtype, M, 16)
        assert max(errors.values()) <= TOLERANCE[dtype], (M, errors)


@gpu_only
def test_gpu_dequantisation_is_bit_exact_at_model_scale():
    w = torch.randn(2048, 640, generator=torch.Generator().manual_seed(5)) * 0.02
    for fmt in FORMATS:
        q = _quantized(fmt, w, 64)
        assert torch.equal(tk.dequantize(q, q.tables("cuda")), q.dequantize())
