"""Triton kernels for the quantized LoRA linear (imported lazily by ``quant_lora``).

Importing this module imports Triton; ``fedlora_kernels.quant_lora`` does so only when a kernel
is about to run on CUDA, or when a test has set ``TRITON_INTERPRET=1`` first (Triton chooses
compiled or interpreted when a kernel is decorated, i.e. when this module is imported). No ``@triton.autotune``: it touches the GPU
driver when the decorator runs, and the interpreter would time every config; block sizes come
from :func:`block_config` instead (tuned offline on an H100: ``benchmarks/kernels.py --sweep``).

Only Triton *builtins* are used (``tl.full``, not ``tl.zeros``; no ``tl.sum``/``tl.cdiv``): the
helpers of ``triton.language.standard`` are ``@jit`` functions created when ``triton.language`` is
imported, and under the interpreter they fail ("Cannot call @triton.jit'd outside of the scope of a
kernel") if ``triton.language`` was imported before ``TRITON_INTERPRET=1`` was set — which torch
and transformers do in a test process.

Kernels:

* ``_fwd_kernel``  y[m, n] = Σ_k x[m, k]·deq(W)[n, k] + s·Σ_j xa[m, j]·B[n, j], with
  xa = x·Aᵀ accumulated in the same K loop (and written out once, for the backward)
* ``_dx_kernel``   dx[m, k] = Σ_n dy[m, n]·deq(W)[n, k] + s·Σ_j dyb[m, j]·A[j, k], with
  dyb = dy·B accumulated in the same N loop (and written out once, for dA)
* ``_deq_kernel``  the dense deq(W) in fp32 or the activation dtype (bit-exactness tests; the
  large-M path, which decodes one layer into a temporary and hands the GEMM to cuBLAS)

All three decode W tile by tile with the same ``_deq_tile``. Fast path (``ALIGNED``: K a multiple
of BK, BK a multiple of the format's group): 4-bit codes are read as contiguous bytes and split
into nibble pairs (``tl.join`` + ``tl.reshape``), the scale / zero / absmax are read once per
(row, group) and broadcast over the group. Other shapes (odd K, NF4 blocks straddling rows) take
a per-element path. Index math is int32 (the host checks N·K < 2³¹). Launches pass
``enable_fp_fusion=False`` so NF4's absmax decode (a product then a sum) is not contracted into
an FMA: that keeps the decode bit-exact with the torch reference.

Dispatch by M (:func:`fused_for`): the fused kernels are weight-bandwidth bound and win at small
M; from ``FUSED_MAX_M`` tokens on the GEMM is compute bound and the decode (one layer, ≈ 10 µs for
4096²) is cheaper than re-decoding W in every M tile, so W goes to a temporary in the activation
dtype and cuBLAS runs the GEMM — never more than one layer's temporary, never a persistent copy of W.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

FMT_NF4, FMT_INT8, FMT_INTK = 0, 1, 2
_FORMATS = {"nf4": FMT_NF4, "int8": FMT_INT8, "intk": FMT_INTK}
# M above which the forward and dX decode W into a one-layer temporary and call cuBLAS. On an H100
# (4096², r = 16) the fused tiles lost to decode (≈ 21 µs) + cuBLAS from M ≈ 32 on: see
# docs/quantization.md.
FUSED_MAX_M = 32


@triton.jit
def _nf4_select(p4, q):
    """levels[q] by a 4-level select tree over the 16 levels (registers, no per-value gather)."""
    b0 = (q & 1) != 0
    b1 = (q & 2) != 0
    b2 = (q & 4) != 0
    s0 = tl.where(b1, tl.where(b0, tl.load(p4 + 3), tl.load(p4 + 2)), tl.where(b0, tl.load(p4 + 1), tl.load(p4 + 0)))
    s1 = tl.where(b1, tl.where(b0, tl.load(p4 + 7), tl.load(p4 + 6)), tl.where(b0, tl.load(p4 + 5), tl.load(p4 + 4)))
    s2 = tl.where(b1, tl.where(b0, tl.load(p4 + 11), tl.load(p4 + 10)), tl.where(b0, tl.load(p4 + 9), tl.load(p4 + 8)))
    s3 = tl.where(b1, tl.where(b0, tl.load(p4 + 15), tl.load(p4 + 14)), tl.where(b0, tl.load(p4 + 13), tl.load(p4 + 12)))
    return tl.where((q & 8) != 0, tl.where(b2, s3, s2), tl.where(b2, s1, s0))


@triton.jit
def _nf4_absmax(p1, p2, p3, p5, block, mask, DQ: tl.constexpr):
    """NF4 absmax of each 64-value ``block``: stored fp32 (p1), or double-quantised (p1 8-bit
    codes into the p5 table, × the per-256-block scale p2, + the offset p3)."""
    if DQ:
        qa = tl.load(p1 + block, mask=mask, other=0).to(tl.int32)
        absmax = tl.load(p5 + qa) * tl.load(p2 + block // 256, mask=mask, other=0.0)
        absmax = absmax + tl.load(p3)
    else:
        absmax = tl.load(p1 + block, mask=mask, other=0.0)
    return absmax


@triton.jit
def _deq_tile(
    p0, p1, p2, p3, p4, p5,  # format tensors (see _format_args)
    rows, k0, N, K,
    FMT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, DQ: tl.constexpr, ALIGNED: tl.constexpr,
    SELECT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """deq(W)[rows, k0:k0+BK] as an fp32 (BN, BK) tile; zeros outside W."""
    rmask = rows < N
    if ALIGNED:  # K % BK == 0 and BK % GROUP == 0: whole groups, only rows need a mask
        m2 = rmask[:, None]
        if FMT == 1:  # int8 per channel: p0 codes (N, K), p1 scale (N,)
            q = tl.load(p0 + rows[:, None] * K + (k0 + tl.arange(0, BK))[None, :], mask=m2, other=0).to(tl.float32)
            w = q * tl.load(p1 + rows, mask=rmask, other=0.0)[:, None]
        else:
            # 4-bit codes: one contiguous byte row per W row, two values per byte
            if BITS == 4:
                byte = tl.load(p0 + rows[:, None] * (K // 2) + (k0 // 2 + tl.arange(0, BK // 2))[None, :], mask=m2, other=0)
                byte = byte.to(tl.int32)
            if FMT == 0:  # NF4: p0 codes, p1 absmax, p2 absmax_scale, p3 absmax_offset, p4 levels, p5 absmax levels
                # first value in the high nibble; levels looked up per nibble, then interleaved
                if SELECT:
                    lv = tl.join(_nf4_select(p4, byte >> 4), _nf4_select(p4, byte & 15))  # (BN, BK/2, 2)
                else:
                    lv = tl.join(tl.load(p4 + (byte >> 4)), tl.load(p4 + (byte & 15)))
                lv = tl.reshape(lv, (BN, BK // 64, 64))
                blk = rows[:, None] * (K // 64) + (k0 // 64 + tl.arange(0, BK // 64))[None, :]  # (BN, BK/64)
                absmax = _nf4_absmax(p1, p2, p3, p5, blk, m2, DQ)
                w = tl.reshape(lv * absmax[:, :, None], (BN, BK))
            else:  # int4/3/2 group-wise: p0 low plane, p1 high-bit plane (int3), p2 scale fp16, p3 zero uint8
                if BITS == 4:
                    q = tl.reshape(tl.join(byte & 15, byte >> 4), (BN, BK))  # first value in the low nibble
                else:
                    cols = k0 + tl.arange(0, BK)
                    byte = tl.load(p0 + rows[:, None] * (K // 4) + (cols // 4)[None, :], mask=m2, other=0).to(tl.int32)
                    q = (byte >> ((cols % 4) * 2)[None, :]) & 3
                    if BITS == 3:
                        hi = tl.load(p1 + rows[:, None] * (K // 8) + (cols // 8)[None, :], mask=m2, other=0).to(tl.int32)
                        q = q | (((hi >> (cols % 8)[None, :]) & 1) << 2)
                g = rows[:, None] * (K // GROUP) + (k0 // GROUP + tl.arange(0, BK // GROUP))[None, :]  # (BN, BK/G)
                s = tl.load(p2 + g, mask=m2, other=0.0).to(tl.float32)
                z = tl.load(p3 + g, mask=m2, other=0).to(tl.float32)
                q3 = tl.reshape(q.to(tl.float32), (BN, BK // GROUP, GROUP))
                w = tl.reshape((q3 - z[:, :, None]) * s[:, :, None], (BN, BK))  # q − z exact: one rounding
    else:  # any shape: per-element indices (NF4 blocks may straddle rows)
        cols = k0 + tl.arange(0, BK)
        mask = rmask[:, None] & (cols < K)[None, :]
        if FMT == 0:
            flat = rows[:, None] * K + cols[None, :]  # row-major index: blocks are flat
            byte = tl.load(p0 + flat // 2, mask=mask, other=0).to(tl.int32)
            idx = tl.where((flat % 2) == 0, byte >> 4, byte & 15)  # first value in the high nibble
            level = tl.load(p4 + idx)
            block = flat // 64
            absmax = _nf4_absmax(p1, p2, p3, p5, block, mask, DQ)
            w = level * absmax
        elif FMT == 1:
            q = tl.load(p0 + rows[:, None] * K + cols[None, :], mask=mask, other=0).to(tl.float32)
            w = q * tl.load(p1 + rows, mask=rmask, other=0.0)[:, None]
        else:
            g = rows[:, None] * (K // GROUP) + (cols // GROUP)[None, :]
            s = tl.load(p2 + g, mask=mask, other=0.0).to(tl.float32)
            z = tl.load(p3 + g, mask=mask, other=0).to(tl.float32)
            if BITS == 4:
                byte = tl.load(p0 + rows[:, None] * (K // 2) + (cols // 2)[None, :], mask=mask, other=0).to(tl.int32)
                q = (byte >> ((cols % 2) * 4)[None, :]) & 15
            else:
                byte = tl.load(p0 + rows[:, None] * (K // 4) + (cols // 4)[None, :], mask=mask, other=0).to(tl.int32)
                q = (byte >> ((cols % 4) * 2)[None, :]) & 3
                if BITS == 3:
                    hi = tl.load(p1 + rows[:, None] * (K // 8) + (cols // 8)[None, :], mask=mask, other=0).to(tl.int32)
                    q = q | (((hi >> (cols % 8)[None, :]) & 1) << 2)
            w = (q.to(tl.float32) - z) * s
    return w


@triton.jit
def _fwd_kernel(
    x_ptr, a_ptr, b_ptr, y_ptr, xa_ptr,
    p0, p1, p2, p3, p4, p5,
    M, N, K, R, KS, scale,
    FMT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, DQ: tl.constexpr, ALIGNED: tl.constexpr,
    HAS_LORA: tl.constexpr, PREC: tl.constexpr, SELECT: tl.constexpr, SPLIT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    """One (BM, BN) tile of y over the K range [pid_s·KS, (pid_s+1)·KS). SPLIT > 1 (split-K, for
    small M: more programs in flight on a weight-bound GEMV): partial sums — of the GEMM and of
    the LoRA term, which is linear in x·Aᵀ — are atomically added to fp32 y and xa."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    k_lo = tl.program_id(2) * KS
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rr = tl.arange(0, BR)
    mmask = rm[:, None] < M
    x_row = x_ptr + rm.to(tl.int64)[:, None] * K  # (BM, 1)
    acc = tl.full((BM, BN), 0.0, tl.float32)
    xa = tl.full((BM, BR), 0.0, tl.float32)
    for k0 in range(k_lo, k_lo + KS, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_row + rk[None, :], mask=mmask & (rk[None, :] < K), other=0.0)  # (BM, BK)
        w = _deq_tile(p0, p1, p2, p3, p4, p5, rn, k0, N, K, FMT, BITS, GROUP, DQ, ALIGNED, SELECT, BN, BK)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=PREC)  # (BM, BK)·(BK, BN)
        if HAS_LORA:  # xa = x·Aᵀ, from the x tile already loaded
            a = tl.load(a_ptr + rr[:, None] * K + rk[None, :], mask=(rr[:, None] < R) & (rk[None, :] < K), other=0.0)
            xa += tl.dot(x, tl.trans(a.to(x.dtype)), input_precision=PREC)  # (BM, BK)·(BK, BR)
    if HAS_LORA:  # + s·(x·Aᵀ)·Bᵀ
        b = tl.load(b_ptr + rn[:, None] * R + rr[None, :], mask=(rn[:, None] < N) & (rr[None, :] < R), other=0.0)
        acc += scale * tl.dot(xa, tl.trans(b), input_precision=PREC)  # Bᵀ K-major: fine for tf32 wgmma
        xa_out = xa_ptr + rm[:, None] * R + rr[None, :]
        if pid_n == 0:  # every N tile formed the same xa; one writes it for the backward
            if SPLIT == 1:
                tl.store(xa_out, xa, mask=mmask & (rr[None, :] < R))
            else:
                tl.atomic_add(xa_out, xa, mask=mmask & (rr[None, :] < R))
    out = y_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
    if SPLIT == 1:
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mmask & (rn[None, :] < N))
    else:
        tl.atomic_add(out, acc, mask=mmask & (rn[None, :] < N))


@triton.jit
def _dx_kernel(
    dy_ptr, a_ptr, b_ptr, dx_ptr, dyb_ptr,
    p0, p1, p2, p3, p4, p5,
    M, N, K, R, NS, scale,
    FMT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, DQ: tl.constexpr, ALIGNED: tl.constexpr,
    HAS_LORA: tl.constexpr, PREC: tl.constexpr, SELECT: tl.constexpr, SPLIT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    """One (BM, BK) tile of dx over the N range [pid_s·NS, (pid_s+1)·NS) (SPLIT > 1: atomics,
    as in ``_fwd_kernel``)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_lo = tl.program_id(2) * NS
    rm = pid_m * BM + tl.arange(0, BM)
    k0 = pid_k * BK
    rk = k0 + tl.arange(0, BK)
    rr = tl.arange(0, BR)
    mmask = rm[:, None] < M
    dy_row = dy_ptr + rm.to(tl.int64)[:, None] * N
    acc = tl.full((BM, BK), 0.0, tl.float32)
    dyb = tl.full((BM, BR), 0.0, tl.float32)
    for n0 in range(n_lo, n_lo + NS, BN):
        rn = n0 + tl.arange(0, BN)
        dy = tl.load(dy_row + rn[None, :], mask=mmask & (rn[None, :] < N), other=0.0)  # (BM, BN)
        w = _deq_tile(p0, p1, p2, p3, p4, p5, rn, k0, N, K, FMT, BITS, GROUP, DQ, ALIGNED, SELECT, BN, BK)
        acc += tl.dot(dy, w.to(dy.dtype), input_precision=PREC)  # (BM, BN)·(BN, BK)
        if HAS_LORA:  # dyb = dy·B, from the dy tile already loaded
            b = tl.load(b_ptr + rn[:, None] * R + rr[None, :], mask=(rn[:, None] < N) & (rr[None, :] < R), other=0.0)
            dyb += tl.dot(dy, b.to(dy.dtype), input_precision=PREC)  # (BM, BN)·(BN, BR)
    if HAS_LORA:  # + s·(dy·B)·A, in the activation dtype: a tf32 dot with A (r, K) row-major
        # (an MN-major fp32 operand) corrupts memory on an H100 with Triton 3.6 (wgmma, BM ≥ 64)
        a = tl.load(a_ptr + rr[:, None] * K + rk[None, :], mask=(rr[:, None] < R) & (rk[None, :] < K), other=0.0)
        acc += scale * tl.dot(dyb.to(dy_ptr.dtype.element_ty), a.to(dy_ptr.dtype.element_ty), input_precision=PREC)
        dyb_out = dyb_ptr + rm[:, None] * R + rr[None, :]
        if pid_k == 0:
            if SPLIT == 1:
                tl.store(dyb_out, dyb, mask=mmask & (rr[None, :] < R))
            else:
                tl.atomic_add(dyb_out, dyb, mask=mmask & (rr[None, :] < R))
    out = dx_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :]
    if SPLIT == 1:
        tl.store(out, acc.to(dx_ptr.dtype.element_ty), mask=mmask & (rk[None, :] < K))
    else:
        tl.atomic_add(out, acc, mask=mmask & (rk[None, :] < K))


@triton.jit
def _deq_kernel(
    out_ptr, p0, p1, p2, p3, p4, p5, N, K,
    FMT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, DQ: tl.constexpr, ALIGNED: tl.constexpr,
    SELECT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    k0 = tl.program_id(1) * BK
    rk = k0 + tl.arange(0, BK)
    w = _deq_tile(p0, p1, p2, p3, p4, p5, rn, k0, N, K, FMT, BITS, GROUP, DQ, ALIGNED, SELECT, BN, BK)
    mask = (rn[:, None] < N) & (rk[None, :] < K)
    tl.store(out_ptr + rn[:, None] * K + rk[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------
# host side


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _format_args(qweight, tables: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
    """The six format pointers and the format constexprs of ``qweight``."""
    kind = qweight.kind
    if kind not in _FORMATS:
        raise ValueError(f"no Triton path for quantized format {kind!r}")
    N, K = qweight.shape
    if N * K >= 2**31:
        raise ValueError(f"a {N}x{K} weight overflows the kernels' int32 indices (N·K must be < 2³¹)")
    dummy = qweight.codes if kind in ("nf4", "int8") else qweight.plane0  # stands in for absent tensors: never read
    consts = {"FMT": _FORMATS[kind], "BITS": 8, "GROUP": 1, "DQ": False, "SELECT": False}
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


def _aligned(K: int, BK: int, group: int) -> bool:
    """The fast decode applies: whole BK tiles, each holding whole groups — at least two, or none
    (int8): a tile of a single group gives a size-1 dimension that Triton 3.6 miscompiles
    (illegal memory access on an H100)."""
    return K % BK == 0 and BK % group == 0 and (group == 1 or BK >= 2 * group)


def _fit_bk(BK: int, K: int, group: int) -> int:
    """BK grown to two groups (≤ 256) where that keeps the fast decode."""
    if group > 1 and group <= 128 and group & (group - 1) == 0 and K % (2 * group) == 0 and BK < 2 * group:
        BK = 2 * group
    return BK


def fused_for(M: int) -> bool:
    """The fused kernels (not decode-then-cuBLAS) for M tokens."""
    return M <= FUSED_MAX_M


def block_config(M: int, N: int, K: int, group: int = 1, *, backward: bool = False) -> dict[str, int]:
    """Tile sizes of the fused kernels. Under the interpreter: small tiles (speed of the CPU
    tests). On a GPU: per-M configs from a partial probe on an H100 (4096², bf16, nf4 and int4
    g128; ``benchmarks/kernels.py --sweep`` is the full sweep, not yet run to completion)."""
    if interpreting():  # small tiles, and split-K / split-N wherever it divides (to test it)
        BK = next(b for b in (128, 64, 32, 16) if K % b == 0 or b == 16)
        return {"BM": 16, "BN": 16 if backward else 32, "BK": BK, "SPLIT": 4, "SELECT": M % 2 == 1}
    # H100, 4096², bf16 (see docs/quantization.md): M ≤ 32 is weight-bandwidth bound and 4096/BN
    # tiles alone leave the SMs idle → split the reduction 4× (forward) / 8× (dX); NF4 levels by
    # the register select tree (2× faster there than the table gather).
    # Fused tiles keep BM ≤ 32 (mma.sync): with BM = 64 (wgmma) Triton 3.6 on an H100 corrupted
    # memory in dX (a tf32 dot, now bf16) and, forced fused at M ≥ 40, for int4 g128 (BK = 256).
    # Above FUSED_MAX_M the default dispatch decodes + cuBLAS, so these larger-M tiles only run
    # when a test forces the fused path.
    if not backward:  # tiles over (M, N), loop over K
        if M <= 32:
            cfg = {"BM": 16 if M <= 16 else 32, "BN": 32, "BK": 256, "num_warps": 4, "num_stages": 3, "SPLIT": 4}
        else:
            cfg = {"BM": 32, "BN": 64, "BK": 128, "num_warps": 4, "num_stages": 2}
    else:  # tiles over (M, K), loop over N
        if M <= 32:
            cfg = {"BM": 16 if M <= 16 else 32, "BN": 64, "BK": 128, "num_warps": 4, "num_stages": 3, "SPLIT": 8}
        else:
            cfg = {"BM": 32, "BN": 64, "BK": 128, "num_warps": 4, "num_stages": 2}
    cfg["BK"] = _fit_bk(cfg["BK"], K, group)
    cfg["SELECT"] = True
    return cfg


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(max(r, 1)))


def _launch_config(cfg: dict, dtype: torch.dtype, K: int, group: int, extent: int, tile: str) -> dict:
    """``cfg`` made launchable for these operands: fp32 or a shape off the fast decode gets small
    tiles and two stages (the per-element decode's loads are pipelined through shared memory),
    and SPLIT is cut to a divisor of ``extent`` (K for the forward, N for dX) in ``tile`` units."""
    cfg = dict(cfg)
    cfg.setdefault("SPLIT", 1)
    cfg.setdefault("SELECT", False)
    if dtype == torch.float32 or not _aligned(K, cfg["BK"], group):
        cfg["BK"], cfg["num_stages"] = min(cfg["BK"], 64), min(cfg.get("num_stages", 2), 2)
    while cfg["SPLIT"] > 1 and extent % (cfg["SPLIT"] * cfg[tile]):
        cfg["SPLIT"] -= 1
    return cfg


def forward(x2: torch.Tensor, qweight, tables, A: torch.Tensor | None, B: torch.Tensor | None, scale: float,
            config: dict | None = None, fused: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """(y, xa): y (M, N) = x2·deq(W)ᵀ + scale·(x2·Aᵀ)·Bᵀ and xa = x2·Aᵀ (M, r) (None without A).

    x2 (M, K) contiguous; A (r, K), B (N, r). Fused kernel for small M (xa in fp32), else decode
    W into a one-layer temporary and cuBLAS (xa in x2's dtype)."""
    M, K = x2.shape
    N = qweight.shape[0]
    has_lora = A is not None and A.shape[0] > 0
    if not (fused_for(M) if fused is None else fused):
        w = dequantize(qweight, tables, x2.dtype)  # (N, K), the one-layer temporary
        y = x2 @ w.t()
        if not has_lora:
            return y, None
        xa = x2 @ A.t().to(x2.dtype)  # (M, r)
        return y.addmm_(xa, B.t().to(x2.dtype), alpha=scale), xa
    ptrs, consts = _format_args(qweight, tables)
    r = A.shape[0] if has_lora else 0
    cfg = _launch_config(config or block_config(M, N, K, consts["GROUP"]), x2.dtype, K, consts["GROUP"], K, "BK")
    split = cfg["SPLIT"]
    new = torch.empty if split == 1 else torch.zeros
    y = new(M, N, dtype=x2.dtype if split == 1 else torch.float32, device=x2.device)
    xa = new(M, r, dtype=torch.float32, device=x2.device) if has_lora else None
    grid = (triton.cdiv(M, cfg["BM"]), triton.cdiv(N, cfg["BN"]), split)
    _fwd_kernel[grid](
        x2, A.contiguous() if has_lora else x2, B.contiguous() if has_lora else x2, y, xa if has_lora else y,
        *ptrs, M, N, K, r, K // split, float(scale),
        HAS_LORA=has_lora, PREC=_precision(x2.dtype), BR=_rank_block(r), ALIGNED=_aligned(K, cfg["BK"], consts["GROUP"]),
        enable_fp_fusion=False, **(consts | cfg),
    )  # fmt: skip
    return (y if split == 1 else y.to(x2.dtype)), xa


def backward_dx(dy2: torch.Tensor, qweight, tables, A: torch.Tensor | None, B: torch.Tensor | None, scale: float,
                config: dict | None = None, fused: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """(dx, dyb): dx (M, K) = dy2·deq(W) + scale·(dy2·B)·A and dyb = dy2·B (M, r) (None without A)."""
    M, N = dy2.shape
    K = qweight.shape[1]
    has_lora = A is not None and A.shape[0] > 0
    if not (fused_for(M) if fused is None else fused):
        w = dequantize(qweight, tables, dy2.dtype)  # (N, K), the one-layer temporary
        dx = dy2 @ w
        if not has_lora:
            return dx, None
        dyb = dy2 @ B.to(dy2.dtype)  # (M, r)
        return dx.addmm_(dyb, A.to(dy2.dtype), alpha=scale), dyb
    ptrs, consts = _format_args(qweight, tables)
    r = A.shape[0] if has_lora else 0
    cfg = _launch_config(config or block_config(M, N, K, consts["GROUP"], backward=True), dy2.dtype, K, consts["GROUP"], N, "BN")
    split = cfg["SPLIT"]
    new = torch.empty if split == 1 else torch.zeros
    dx = new(M, K, dtype=dy2.dtype if split == 1 else torch.float32, device=dy2.device)
    dyb = new(M, r, dtype=torch.float32, device=dy2.device) if has_lora else None
    grid = (triton.cdiv(M, cfg["BM"]), triton.cdiv(K, cfg["BK"]), split)
    _dx_kernel[grid](
        dy2, A.contiguous() if has_lora else dy2, B.contiguous() if has_lora else dy2, dx, dyb if has_lora else dx,
        *ptrs, M, N, K, r, N // split, float(scale),
        HAS_LORA=has_lora, PREC=_precision(dy2.dtype), BR=_rank_block(r), ALIGNED=_aligned(K, cfg["BK"], consts["GROUP"]),
        enable_fp_fusion=False, **(consts | cfg),
    )  # fmt: skip
    return (dx if split == 1 else dx.to(dy2.dtype)), dyb


def dequantize(qweight, tables, dtype: torch.dtype = torch.float32, select: bool = False) -> torch.Tensor:
    """The dense deq(W) (N, K) in ``dtype`` (fp32: exact; else rounded once, as ``.to(dtype)``),
    decoded by the kernels' own ``_deq_tile``."""
    N, K = qweight.shape
    out = torch.empty(N, K, dtype=dtype, device=qweight.device)
    ptrs, consts = _format_args(qweight, tables)
    if interpreting():
        BN, BK, warps = 16, next(b for b in (128, 64, 32, 16) if K % b == 0 or b == 16), 4
    else:
        BN, BK, warps = 32, next((b for b in (256, 128, 64) if K % b == 0), 64), 4
    BK = _fit_bk(BK, K, consts["GROUP"])
    grid = (triton.cdiv(N, BN), triton.cdiv(K, BK))
    _deq_kernel[grid](out, *ptrs, N, K, ALIGNED=_aligned(K, BK, consts["GROUP"]), BN=BN, BK=BK,
                      num_warps=warps, enable_fp_fusion=False, **(consts | {"SELECT": select}))  # fmt: skip
    return out
