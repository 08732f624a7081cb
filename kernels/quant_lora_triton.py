"""Triton kernels for the quantized LoRA linear (imported lazily by ``quant_lora``).

Importing this module imports Triton; ``fedlora_kernels.quant_lora`` does so only when a kernel
is about to run on CUDA, or when a test has set ``TRITON_INTERPRET=1`` first (Triton chooses
compiled or interpreted when a kernel is decorated, i.e. when this module is imported). No ``@triton.autotune``: it touches the GPU
driver when the decorator runs, and the interpreter would time every config; block sizes come
from :func:`block_config` instead.

Only Triton *builtins* are used (``tl.full``, not ``tl.zeros``; no ``tl.sum``/``tl.cdiv``): the
helpers of ``triton.language.standard`` are ``@jit`` functions created when ``triton.language`` is
imported, and under the interpreter they fail ("Cannot call @triton.jit'd outside of the scope of a
kernel") if ``triton.language`` was imported before ``TRITON_INTERPRET=1`` was set — which torch
and transformers do in a test process.

Kernels:

* ``_fwd_kernel``  y[m, n] = Σ_k x[m, k]·deq(W)[n, k] + s·Σ_j xa[m, j]·B[n, j]
* ``_dx_kernel``   dx[m, k] = Σ_n dy[m, n]·deq(W)[n, k] + s·Σ_j dyb[m, j]·A[j, k]
* ``_deq_kernel``  the dense deq(W) (bit-exactness tests, the dequantise-then-matmul baseline)

All three decode W tile by tile with the same ``_deq_tile``: codes are read from global memory,
decoded in registers to fp32, cast to the activation dtype and fed to ``tl.dot``; a dense W never
exists. Launches pass ``enable_fp_fusion=False`` so NF4's absmax decode (a product then a sum)
is not contracted into an FMA: that keeps the decode bit-exact with the torch reference.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

FMT_NF4, FMT_INT8, FMT_INTK = 0, 1, 2
_FORMATS = {"nf4": FMT_NF4, "int8": FMT_INT8, "intk": FMT_INTK}


@triton.jit
def _deq_tile(
    p0, p1, p2, p3, p4, p5,  # format tensors (see _format_args)
    rows, cols, mask, N, K,
    FMT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, DQ: tl.constexpr,
):  # fmt: skip
    """deq(W)[rows, cols] as an fp32 (len(rows), len(cols)) tile; zeros where ``mask`` is off."""
    if FMT == 0:  # NF4: p0 codes, p1 absmax, p2 absmax_scale, p3 absmax_offset, p4 levels, p5 absmax levels
        flat = rows.to(tl.int64)[:, None] * K + cols[None, :]  # row-major index: blocks are flat
        byte = tl.load(p0 + flat // 2, mask=mask, other=0).to(tl.int32)
        idx = tl.where((flat % 2) == 0, byte >> 4, byte & 15)  # first value in the high nibble
        level = tl.load(p4 + idx)
        block = flat // 64
        if DQ:
            qa = tl.load(p1 + block, mask=mask, other=0).to(tl.int32)
            absmax = tl.load(p5 + qa) * tl.load(p2 + block // 256, mask=mask, other=0.0)
            absmax = absmax + tl.load(p3)
        else:
            absmax = tl.load(p1 + block, mask=mask, other=0.0)
        w = level * absmax
    elif FMT == 1:  # int8 per channel: p0 codes (N, K), p1 scale (N,)
        q = tl.load(p0 + rows.to(tl.int64)[:, None] * K + cols[None, :], mask=mask, other=0).to(tl.float32)
        s = tl.load(p1 + rows, mask=rows < N, other=0.0)
        w = q * s[:, None]
    else:  # int4/3/2 group-wise: p0 low plane, p1 high-bit plane (int3), p2 scale fp16, p3 zero uint8
        r64 = rows.to(tl.int64)[:, None]
        g = r64 * (K // GROUP) + (cols // GROUP)[None, :]
        s = tl.load(p2 + g, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(p3 + g, mask=mask, other=0).to(tl.float32)
        if BITS == 4:
            byte = tl.load(p0 + r64 * (K // 2) + (cols // 2)[None, :], mask=mask, other=0).to(tl.int32)
            q = (byte >> ((cols % 2) * 4)[None, :]) & 15
        else:
            byte = tl.load(p0 + r64 * (K // 4) + (cols // 4)[None, :], mask=mask, other=0).to(tl.int32)
            q = (byte >> ((cols % 4) * 2)[None, :]) & 3
            if BITS == 3:
                hi = tl.load(p1 + r64 * (K // 8) + (cols // 8)[None, :], mask=mask, other=0).to(tl.int32)
                q = q | (((hi >> (cols % 8)[None, :]) & 1) << 2)
        w = (q.to(tl.float32) - z) * s  # q − z is an exact integer: one rounding, as the reference
    return w


@triton.jit
def _fwd_kernel(
    x_ptr, xa_ptr, b_ptr, y_ptr,
    p0, p1, p2, p3, p4, p5,
    M, N, K, R, scale,
    FMT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, DQ: tl.constexpr,
    HAS_LORA: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.full((BM, BN), 0.0, tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        w = _deq_tile(p0, p1, p2, p3, p4, p5, rn, rk, (rn[:, None] < N) & (rk[None, :] < K), N, K, FMT, BITS, GROUP, DQ)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=PREC)  # (BM, BK)·(BK, BN)
    if HAS_LORA:  # + s·(x·Aᵀ)·Bᵀ, with x·Aᵀ (M, r) formed once outside
        rr = tl.arange(0, BR)
        xa = tl.load(xa_ptr + rm[:, None] * R + rr[None, :], mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
        b = tl.load(b_ptr + rn[:, None] * R + rr[None, :], mask=(rn[:, None] < N) & (rr[None, :] < R), other=0.0)
        acc += scale * tl.dot(xa, tl.trans(b), input_precision=PREC)
    out = y_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _dx_kernel(
    dy_ptr, dyb_ptr, a_ptr, dx_ptr,
    p0, p1, p2, p3, p4, p5,
    M, N, K, R, scale,
    FMT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, DQ: tl.constexpr,
    HAS_LORA: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = pid_k * BK + tl.arange(0, BK)
    acc = tl.full((BM, BK), 0.0, tl.float32)
    for n0 in range(0, N, BN):
        rn = n0 + tl.arange(0, BN)
        dy = tl.load(dy_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
        w = _deq_tile(p0, p1, p2, p3, p4, p5, rn, rk, (rn[:, None] < N) & (rk[None, :] < K), N, K, FMT, BITS, GROUP, DQ)
        acc += tl.dot(dy, w.to(dy.dtype), input_precision=PREC)  # (BM, BN)·(BN, BK)
    if HAS_LORA:  # + s·(dy·B)·A, with dy·B (M, r) formed once outside
        rr = tl.arange(0, BR)
        dyb = tl.load(dyb_ptr + rm[:, None] * R + rr[None, :], mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
        a = tl.load(a_ptr + rr[:, None] * K + rk[None, :], mask=(rr[:, None] < R) & (rk[None, :] < K), other=0.0)
        acc += scale * tl.dot(dyb, a, input_precision=PREC)
    out = dx_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :]
    tl.store(out, acc.to(dx_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rk[None, :] < K))


@triton.jit
def _deq_kernel(
    out_ptr, p0, p1, p2, p3, p4, p5, N, K,
    FMT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, DQ: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rk = tl.program_id(1) * BK + tl.arange(0, BK)
    mask = (rn[:, None] < N) & (rk[None, :] < K)
    w = _deq_tile(p0, p1, p2, p3, p4, p5, rn, rk, mask, N, K, FMT, BITS, GROUP, DQ)
    tl.store(out_ptr + rn.to(tl.int64)[:, None] * K + rk[None, :], w, mask=mask)


# ------------------------------------------------------------------------------------------
# host side


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _format_args(qweight, tables: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
    """The six format pointers and the format constexprs of ``qweight``."""
    kind = qweight.kind
    if kind not in _FORMATS:
        raise ValueError(f"no Triton path for quantized format {kind!r}")
    dummy = tables.get("dummy")
    if dummy is None:
        dummy = torch.zeros(1, dtype=torch.uint8, device=qweight.device)
    consts = {"FMT": _FORMATS[kind], "BITS": 8, "GROUP": 1, "DQ": False}
    if kind == "nf4":
        dq = qweight.absmax_scale is not None
        ptrs = [
            qweight.codes,
            qweight.absmax,
            qweight.absmax_scale if dq else dummy,
            qweight.absmax_offset if dq else dummy,
            tables["levels"],
            tables["absmax_levels"],
        ]
        consts.update(BITS=4, GROUP=64, DQ=dq)
    elif kind == "int8":
        ptrs = [qweight.codes, qweight.scale, dummy, dummy, dummy, dummy]
    else:
        ptrs = [
            qweight.plane0,
            qweight.plane1 if qweight.plane1 is not None else dummy,
            qweight.scale,
            qweight.zero,
            dummy,
            dummy,
        ]
        consts.update(BITS=qweight.bits, GROUP=qweight.group_size)
    return ptrs, consts


def block_config(M: int, N: int, K: int, *, backward: bool = False) -> dict[str, int]:
    """Tile sizes: small tiles under the interpreter (speed of the CPU tests); on a GPU a
    heuristic by M (not yet tuned on hardware: no GPU was available when this was written)."""
    if interpreting():
        return {"BM": 16, "BN": 32, "BK": 32}
    if M <= 16:
        cfg = {"BM": 16, "BN": 64, "BK": 128, "num_warps": 4, "num_stages": 4}
    elif M <= 128:
        cfg = {"BM": 64, "BN": 64, "BK": 64, "num_warps": 4, "num_stages": 4}
    else:
        cfg = {"BM": 128, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3}
    return cfg


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(max(r, 1)))


def forward(x2: torch.Tensor, qweight, tables, xa: torch.Tensor | None, B: torch.Tensor | None, scale: float,
            config: dict | None = None) -> torch.Tensor:  # fmt: skip
    """y (M, N) = x2·deq(W)ᵀ + scale·xa·Bᵀ; x2 (M, K) contiguous, xa (M, r) and B (N, r) fp32."""
    M, K = x2.shape
    N = qweight.shape[0]
    y = torch.empty(M, N, dtype=x2.dtype, device=x2.device)
    ptrs, consts = _format_args(qweight, tables)
    has_lora = xa is not None and xa.shape[1] > 0
    r = xa.shape[1] if has_lora else 0
    cfg = dict(config or block_config(M, N, K))
    grid = (triton.cdiv(M, cfg["BM"]), triton.cdiv(N, cfg["BN"]))
    _fwd_kernel[grid](
        x2, xa if has_lora else x2, B if has_lora else x2, y, *ptrs, M, N, K, r, float(scale),
        HAS_LORA=has_lora, PREC=_precision(x2.dtype), BR=_rank_block(r), enable_fp_fusion=False,
        **consts, **cfg,
    )  # fmt: skip
    return y


def backward_dx(dy2: torch.Tensor, qweight, tables, dyb: torch.Tensor | None, A: torch.Tensor | None, scale: float,
                config: dict | None = None) -> torch.Tensor:  # fmt: skip
    """dx (M, K) = dy2·deq(W) + scale·dyb·A; dy2 (M, N) contiguous, dyb (M, r) and A (r, K) fp32."""
    M, N = dy2.shape
    K = qweight.shape[1]
    dx = torch.empty(M, K, dtype=dy2.dtype, device=dy2.device)
    ptrs, consts = _format_args(qweight, tables)
    has_lora = dyb is not None and dyb.shape[1] > 0
    r = dyb.shape[1] if has_lora else 0
    cfg = dict(config or block_config(M, N, K, backward=True))
    grid = (triton.cdiv(M, cfg["BM"]), triton.cdiv(K, cfg["BK"]))
    _dx_kernel[grid](
        dy2, dyb if has_lora else dy2, A if has_lora else dy2, dx, *ptrs, M, N, K, r, float(scale),
        HAS_LORA=has_lora, PREC=_precision(dy2.dtype), BR=_rank_block(r), enable_fp_fusion=False,
        **consts, **cfg,
    )  # fmt: skip
    return dx


def dequantize(qweight, tables) -> torch.Tensor:
    """The dense fp32 deq(W) (N, K), decoded by the kernels' own ``_deq_tile``."""
    N, K = qweight.shape
    out = torch.empty(N, K, dtype=torch.float32, device=qweight.device)
    ptrs, consts = _format_args(qweight, tables)
    BN, BK = (16, 32) if interpreting() else (64, 128)
    grid = (triton.cdiv(N, BN), triton.cdiv(K, BK))
    _deq_kernel[grid](out, *ptrs, N, K, BN=BN, BK=BK, enable_fp_fusion=False, **consts)
    return out
