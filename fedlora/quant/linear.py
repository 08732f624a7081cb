"""``QuantLinear``: a frozen linear layer stored quantized, plus an exact low-rank side term.

::

    y = x·deq(W)ᵀ + (x·S_Aᵀ)·S_Bᵀ + bias          S_B (d_out, k), S_A (k, d_in): fp32, frozen

W lives only as packed codes and scales (buffers named ``q_<field>``); no full-precision copy is
kept. The side term S_B·S_A holds what cannot be added to codes exactly: FedEx-LoRA residuals,
FLoRA stacks, a merged adapter. :meth:`add_side_term` appends factors exactly while the rank stays
≤ ``QuantConfig.side_term_max_rank``; past it the ``side_term_policy`` applies and the error it
introduces is returned, for the run's ``metrics.jsonl``:

* ``svd`` — the side term is re-factored exactly (QR of both factors, SVD of the small core) and
  truncated to the max rank; the Frobenius norm of the dropped part is ‖S − S_k‖_F = √Σσ²_dropped.
* ``requantize`` — deq(W) + S is requantized (one dense layer, temporarily), and the new
  quantization error E is compensated by its best rank-(max_rank/2) approximation, which becomes
  the new side term (half the rank left free for later terms). Error: ‖E − SVD_k(E)‖_F.

With an adapter (``LoRALinear`` over this base), :meth:`fused_lora_forward` runs base, side term
and s·B·A as one op (``fedlora_kernels.quant_lora_linear``: Triton on CUDA, torch on CPU).
"""

from __future__ import annotations

import torch
from torch import nn

from fedlora.config import QuantConfig
from fedlora.linear_layout import weight_view
from fedlora.quant.formats import quantize_weight
from fedlora.quant.weight import QuantError, QuantizedWeight
from fedlora_kernels.quant_lora import quant_lora_linear


class QuantLinear(nn.Module):
    """A frozen quantized base layer: ``forward(x) = x·deq(W)ᵀ + x·S_Aᵀ·S_Bᵀ (+ bias)``."""

    def __init__(
        self,
        qweight: QuantizedWeight,
        cfg: QuantConfig,
        *,
        bias: torch.Tensor | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.cfg = cfg
        self.backend = backend
        """``auto`` (Triton on CUDA, torch elsewhere), ``triton`` or ``reference``."""
        self._template = qweight.with_tensors({k: None for k in qweight.tensors()})
        for name, t in qweight.tensors().items():
            self.register_buffer(f"q_{name}", t)
        for name, t in qweight.tables(qweight.device).items():
            self.register_buffer(f"t_{name}", t, persistent=False)  # constants: not part of a checkpoint
        device = qweight.device
        self.register_buffer("side_A", torch.zeros(0, self.in_features, device=device))  # (k, d_in)
        self.register_buffer("side_B", torch.zeros(self.out_features, 0, device=device))  # (d_out, k)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.side_version = 0
        """Bumped whenever the policy rewrites the side term (merge tokens check it)."""

    @classmethod
    def from_linear(cls, linear: nn.Module, cfg: QuantConfig, *, qweight: QuantizedWeight | None = None) -> QuantLinear:
        """Quantize the weight of ``linear`` (``nn.Linear``, or a ``Conv1D`` whose transposed weight is
        read as (d_out, d_in) through :func:`fedlora.linear_layout.weight_view`; the result is an
        ordinary x·Wᵀ layer either way), or take the given ``qweight``, e.g. LoftQ's."""
        if qweight is None:
            qweight = quantize_weight(weight_view(linear).detach().float(), cfg)
        return cls(qweight, cfg, bias=linear.bias)

    # --- the packed weight ----------------------------------------------------------------------

    @property
    def qweight(self) -> QuantizedWeight:
        """The packed weight over this module's current buffers (follows ``.to(device)``)."""
        return self._template.with_tensors({n[2:]: b for n, b in self._buffers.items() if n.startswith("q_")})

    def _tables(self) -> dict[str, torch.Tensor]:
        return {n.removeprefix("t_"): b for n, b in self._buffers.items() if n.startswith("t_")}

    @torch.no_grad()
    def dequantize(self) -> torch.Tensor:
        """deq(W), fp32 (d_out, d_in): the quantized part only (a temporary: one layer)."""
        return self.qweight.dequantize()

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """deq(W) + S_B·S_A, fp32: the dense matrix this layer applies (bias aside)."""
        return self.dequantize() + self.side_B @ self.side_A

    @property
    def side_rank(self) -> int:
        return self.side_A.shape[0]

    @property
    def nbytes(self) -> int:
        """Persistent bytes of the packed weight (codes + scales); see :attr:`side_nbytes`."""
        return self.qweight.nbytes

    @property
    def side_nbytes(self) -> int:
        return 4 * (self.side_A.numel() + self.side_B.numel())

    # --- forward --------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.side_rank
        y = quant_lora_linear(
            x, self.qweight, self.side_A if k else None, self.side_B if k else None, 1.0,
            tables=self._tables(), backend=self.backend,
        )  # fmt: skip
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def fused_lora_forward(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
        """x·deq(W)ᵀ + x·S_Aᵀ·S_Bᵀ + scale·(x·Aᵀ)·Bᵀ in one op; gradients reach x, A and B."""
        if self.side_rank:  # the side term rides along as extra (frozen) rank
            A = torch.cat([A, self.side_A.to(A.dtype)], dim=0)  # (r + k, d_in)
            B = torch.cat([scale * B, self.side_B.to(B.dtype)], dim=1)  # (d_out, r + k)
            scale = 1.0
        y = quant_lora_linear(x, self.qweight, A, B, scale, tables=self._tables(), backend=self.backend)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    # --- the side term --------------------------------------------------------------------------

    @torch.no_grad()
    def add_side_term(self, B: torch.Tensor, A: torch.Tensor, *, exact: bool = False) -> dict:
        """Add B·A (B (d_out, r), A (r, d_in); any scale already folded into B) to this layer.

        Returns a report: ``policy`` (``append``, ``svd`` or ``requantize``), ``rank`` (side rank
        after), ``error_fro`` (‖intended − stored‖_F of the layer's dense weight), ``relative_error``
        (error_fro / ‖S_intended‖_F, S_intended = old side term + B·A), ``start``/``stop``/``version``
        (where the new factors sit, for :meth:`remove_side_term`). ``exact=True`` raises
        :class:`QuantError` instead of applying a lossy policy.
        """
        if B.shape[0] != self.out_features or A.shape[1] != self.in_features or B.shape[1] != A.shape[0]:
            raise QuantError(
                f"side term B{tuple(B.shape)}·A{tuple(A.shape)} does not fit a "
                f"({self.out_features}, {self.in_features}) layer"
            )
        start = self.side_rank
        new_B = torch.cat([self.side_B, B.to(self.side_B)], dim=1)
        new_A = torch.cat([self.side_A, A.to(self.side_A)], dim=0)
        max_rank = self.cfg.side_term_max_rank
        if new_A.shape[0] <= max_rank:
            self.side_A, self.side_B = new_A, new_B
            return {"policy": "append", "rank": self.side_rank, "error_fro": 0.0, "relative_error": 0.0,
                    "start": start, "stop": self.side_rank, "version": self.side_version}  # fmt: skip
        if exact:
            raise QuantError(
                f"an exact side term of rank {new_A.shape[0]} exceeds quant.side_term_max_rank={max_rank}; "
                "raise quant.side_term_max_rank, or merge through add_side_term with a lossy policy "
                "(quant.side_term_policy=svd|requantize) and log the error it reports"
            )
        if self.cfg.side_term_policy == "svd":
            report = self._svd_truncate(new_B, new_A, max_rank)
        else:
            report = self._requantize(new_B, new_A, max(max_rank // 2, 1))
        self.side_version += 1
        report.update(start=None, stop=None, version=self.side_version)
        return report

    def _svd_truncate(self, B: torch.Tensor, A: torch.Tensor, k: int) -> dict:
        # B·A = Q_b·(R_b·R_aᵀ)·Q_aᵀ with orthonormal Q's, so the SVD of the small core gives the
        # exact singular values of B·A without forming the dense (d_out, d_in) product.
        qb, rb = torch.linalg.qr(B.double())  # (N, m), (m, R)
        qa, ra = torch.linalg.qr(A.double().t())  # (K, m'), (m', R)
        u, s, vh = torch.linalg.svd(rb @ ra.t(), full_matrices=False)
        k = min(k, s.numel())
        total, dropped = float((s**2).sum()), float((s[k:] ** 2).sum())
        self.side_B = ((qb @ u[:, :k]) * s[:k]).float()  # (N, k)
        self.side_A = (vh[:k] @ qa.t()).float()  # (k, K)
        err = dropped**0.5
        return {"policy": "svd", "rank": k, "error_fro": err, "relative_error": err / total**0.5 if total else 0.0,
                "dropped_energy": dropped}  # fmt: skip

    def _requantize(self, B: torch.Tensor, A: torch.Tensor, k: int) -> dict:
        side = B @ A  # (N, K), temporary
        target = self.dequantize() + side
        qweight = quantize_weight(target, self.cfg)
        resid = (target - qweight.dequantize()).double()  # the new quantization error E
        u, s, vh = torch.linalg.svd(resid, full_matrices=False)
        k = min(k, s.numel())
        for name, t in qweight.tensors().items():
            setattr(self, f"q_{name}", t.to(getattr(self, f"q_{name}").device))
        self.side_B = (u[:, :k] * s[:k]).float()
        self.side_A = vh[:k].float()
        err = float((s[k:] ** 2).sum()) ** 0.5
        norm = float(side.norm())
        return {"policy": "requantize", "rank": k, "error_fro": err, "relative_error": err / norm if norm else 0.0,
                "dropped_energy": err**2}  # fmt: skip

    @torch.no_grad()
    def remove_side_term(self, token: dict) -> None:
        """Undo an exact :meth:`add_side_term` (its returned report is the token)."""
        if token.get("policy") != "append" or token["version"] != self.side_version or token["stop"] != self.side_rank:
            raise QuantError("this side term was rewritten by the side-term policy (or others were added after "
                             "it) and can no longer be removed exactly")  # fmt: skip
        self.side_A = self.side_A[: token["start"]].clone()
        self.side_B = self.side_B[:, : token["start"]].clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # The side term's rank is data, not architecture: take the checkpoint's.
        for name in ("side_A", "side_B"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.cfg.format}, "
                f"kind={self._template.kind}, bytes/param={self.qweight.bytes_per_param:.4f}, side_rank={self.side_rank}")  # fmt: skip
