"""fedlora values ↔ ``fedlora.v1`` messages (protos/fedlora/v1/*.proto, docs/protos.md).

- :class:`GlobalState` / :data:`AdapterState` ↔ ``Adapter``: every tensor is stored in its own
  dtype as little-endian bytes, so an fp32 adapter round-trips bit for bit (``compression="none"``);
  with fp16/bf16/int8 (:mod:`fedlora.protocol.compression`) the layers' factors come back as fp32 of the
  compressed values. Layer order, base terms (factored or dense) and extras are kept.
- a ``metrics.jsonl`` row ↔ ``RoundSummary``;
- ``privacy_report.json`` → ``PrivacyReport`` (key figures + the whole JSON).

The serialised ``Adapter`` is deterministic (:func:`serialize_adapter`), so its SHA-256 identifies
an adapter. :func:`write_global_adapter` stores one atomically as ``<run_dir>/global_adapter.pb``,
the file ``fedlora serve`` prefers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlora.adapters.state import AdapterState, LoraFactors
from fedlora.aggregation.common import GlobalState
from fedlora.aggregation.terms import DenseTerm
from fedlora.protocol.compression import CompressedTensor, check_scheme, compress_tensor, decompress_tensor
from fedlora.model.peft_export import export_state
from fedlora.proto.v1 import adapter_pb2 as pb
from fedlora.proto.v1 import run_pb2
from fedlora.rundir.files import GLOBAL_ADAPTER_FILE


class ProtoError(ValueError):
    """A message or file does not hold what fedlora.v1 says it should."""


# torch dtype ↔ DType ↔ little-endian numpy dtype (bfloat16 travels as its 16 raw bits)
_DTYPES = {
    torch.float32: (pb.DTYPE_FLOAT32, "<f4"),
    torch.float64: (pb.DTYPE_FLOAT64, "<f8"),
    torch.float16: (pb.DTYPE_FLOAT16, "<f2"),
    torch.bfloat16: (pb.DTYPE_BFLOAT16, "<i2"),
    torch.int8: (pb.DTYPE_INT8, "i1"),
    torch.uint8: (pb.DTYPE_UINT8, "u1"),
    torch.int32: (pb.DTYPE_INT32, "<i4"),
    torch.int64: (pb.DTYPE_INT64, "<i8"),
    torch.bool: (pb.DTYPE_BOOL, "u1"),
}
_TORCH_OF = {code: t for t, (code, _) in _DTYPES.items()}
_SCHEMES = {
    "none": pb.COMPRESSION_NONE,
    "fp16": pb.COMPRESSION_FP16,
    "bf16": pb.COMPRESSION_BF16,
    "int8": pb.COMPRESSION_INT8_ABSMAX,
}
_SCHEME_OF = {code: name for name, code in _SCHEMES.items()}
_COMPRESSED_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}


def compression_code(scheme: str) -> int:
    return _SCHEMES[check_scheme(scheme)]


def compression_name(code: int) -> str:
    try:
        return _SCHEME_OF[code]
    except KeyError:
        raise ProtoError(f"unknown Compression value {code}; this reader knows {sorted(_SCHEME_OF)}") from None


# ---------------------------------------------------------------- tensors


def tensor_to_proto(t: torch.Tensor) -> pb.Tensor:
    """Exact: the tensor's own dtype, row-major, little-endian."""
    t = t.detach().to("cpu").contiguous()
    if t.dtype not in _DTYPES:
        raise ProtoError(f"tensors of dtype {t.dtype} cannot be stored; use one of {list(_DTYPES)}")
    code, np_dtype = _DTYPES[t.dtype]
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t.to(torch.uint8) if t.dtype == torch.bool else t
    data = raw.numpy().astype(np_dtype, copy=False).tobytes()
    return pb.Tensor(shape=list(t.shape), dtype=code, data=data)


def compressed_to_proto(c: CompressedTensor) -> pb.Tensor:
    msg = tensor_to_proto(c.data)
    msg.compression = compression_code(c.scheme)
    if c.scales is not None:
        msg.scales.extend(c.scales.tolist())  # fp32 values → proto float: exact
        msg.scale_dim = c.scale_dim
    return msg


def _raw_tensor(msg: pb.Tensor) -> torch.Tensor:
    if msg.dtype not in _TORCH_OF:
        raise ProtoError(f"Tensor has unknown dtype {msg.dtype}")
    dtype = _TORCH_OF[msg.dtype]
    np_dtype = np.dtype(_DTYPES[dtype][1])
    shape = tuple(int(n) for n in msg.shape)
    numel = math.prod(shape)
    if len(msg.data) != numel * np_dtype.itemsize:
        raise ProtoError(f"Tensor of shape {shape} and dtype {dtype} needs {numel * np_dtype.itemsize} bytes; "
                         f"got {len(msg.data)}")
    arr = np.frombuffer(msg.data, dtype=np_dtype).reshape(shape).astype(np_dtype.newbyteorder("="))  # a copy
    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t.to(torch.bool) if dtype == torch.bool else t


def proto_to_tensor(msg: pb.Tensor) -> torch.Tensor:
    """The stored tensor (exact), or fp32 of the compressed values."""
    raw = _raw_tensor(msg)
    scheme = compression_name(msg.compression)
    if scheme == "none":
        return raw
    if raw.dtype != _COMPRESSED_DTYPE[scheme]:
        raise ProtoError(f"a {scheme} Tensor must hold {_COMPRESSED_DTYPE[scheme]} data; got {raw.dtype}")
    scales = torch.tensor(list(msg.scales), dtype=torch.float32) if scheme == "int8" else None
    try:
        return decompress_tensor(CompressedTensor(scheme, raw, scales, msg.scale_dim))
    except ValueError as err:
        raise ProtoError(str(err)) from None


# ---------------------------------------------------------------- factors, base terms, extras


def factors_to_proto(name: str, f: LoraFactors, compression: str = "none") -> pb.LoraFactors:
    """A as (r, d_in) and B as (d_out, r); compressed with int8 scales along the rank axis."""
    if compression == "none":
        a, b = tensor_to_proto(f.A), tensor_to_proto(f.B)
    else:
        a = compressed_to_proto(compress_tensor(f.A, compression, scale_dim=0))  # a scale per row of A
        b = compressed_to_proto(compress_tensor(f.B, compression, scale_dim=1))  # a scale per column of B
    return pb.LoraFactors(name=name, rank=f.A.shape[0], scale=float(f.scale), a=a, b=b)


def proto_to_factors(msg: pb.LoraFactors) -> LoraFactors:
    a, b = proto_to_tensor(msg.a), proto_to_tensor(msg.b)
    if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0] or a.shape[0] != msg.rank:
        raise ProtoError(f"layer {msg.name!r}: rank {msg.rank} with A{tuple(a.shape)} B{tuple(b.shape)}; "
                         "expected A (rank, d_in) and B (d_out, rank)")
    return LoraFactors(a, b, msg.scale)


def _term_to_proto(term: LoraFactors | DenseTerm) -> pb.BaseTerm:
    if isinstance(term, DenseTerm):
        return pb.BaseTerm(dense=pb.DenseTerm(weight=tensor_to_proto(term.weight), scale=float(term.scale)))
    return pb.BaseTerm(factors=factors_to_proto("", term))


def _proto_to_term(msg: pb.BaseTerm) -> LoraFactors | DenseTerm:
    if msg.WhichOneof("term") == "dense":
        return DenseTerm(proto_to_tensor(msg.dense.weight), msg.dense.scale)
    if msg.WhichOneof("term") == "factors":
        return proto_to_factors(msg.factors)
    raise ProtoError("a BaseTerm holds neither factors nor a dense term")


def value_to_proto(value: Any, path: str = "extras") -> pb.Value:
    """A JSON-like tree whose leaves may be tensors or LoraFactors (tuples become lists)."""
    if value is None:
        return pb.Value(null_value=pb.Null())
    if isinstance(value, (bool, np.bool_)):
        return pb.Value(bool_value=bool(value))
    if isinstance(value, (int, np.integer)):
        return pb.Value(int_value=int(value))
    if isinstance(value, (float, np.floating)):
        return pb.Value(double_value=float(value))
    if isinstance(value, str):
        return pb.Value(string_value=value)
    if isinstance(value, LoraFactors):
        return pb.Value(factors_value=factors_to_proto("", value))
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return pb.Value(tensor_value=tensor_to_proto(torch.as_tensor(value)))
    if isinstance(value, (list, tuple)):
        return pb.Value(list_value=pb.ValueList(items=[value_to_proto(v, f"{path}[{i}]") for i, v in enumerate(value)]))
    if isinstance(value, Mapping):
        return pb.Value(map_value=map_to_proto(value, path))
    raise ProtoError(f"{path} is a {type(value).__name__}, which fedlora.v1 cannot store; use numbers, "
                     "strings, lists, dicts, tensors or LoraFactors")


def map_to_proto(mapping: Mapping, path: str = "extras") -> pb.ValueMap:
    entries = []
    for key, v in mapping.items():
        if isinstance(key, str):
            entries.append(pb.MapEntry(string_key=key, value=value_to_proto(v, f"{path}[{key!r}]")))
        elif isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            entries.append(pb.MapEntry(int_key=int(key), value=value_to_proto(v, f"{path}[{key}]")))
        else:
            raise ProtoError(f"{path} has a key of type {type(key).__name__}; only str and int keys can be stored")
    return pb.ValueMap(entries=entries)


def proto_to_value(msg: pb.Value) -> Any:
    kind = msg.WhichOneof("kind")
    if kind in (None, "null_value"):
        return None
    if kind == "tensor_value":
        return proto_to_tensor(msg.tensor_value)
    if kind == "factors_value":
        return proto_to_factors(msg.factors_value)
    if kind == "list_value":
        return [proto_to_value(v) for v in msg.list_value.items]
    if kind == "map_value":
        return proto_to_map(msg.map_value)
    return getattr(msg, kind)


def proto_to_map(msg: pb.ValueMap) -> dict:
    return {getattr(e, e.WhichOneof("key") or "string_key"): proto_to_value(e.value) for e in msg.entries}


# ---------------------------------------------------------------- adapters


def state_to_adapter(
    state: GlobalState | AdapterState,
    *,
    compression: str = "none",
    merged: bool = False,
    run: str = "",
    round: int = 0,
    strategy: str = "",
    base_model: str = "",
    lora_alpha: float = 0.0,
    use_rslora: bool = False,
) -> pb.Adapter:
    """The ``Adapter`` message of a global state (or a bare adapter state).

    ``merged``: one plain LoRA per layer equal to the whole update, base terms folded in
    (:func:`fedlora.model.peft_export.export_state`; needs ``lora_alpha`` when there are base terms), and
    no extras — what an inference server loads. ``compression`` applies to the layers' factors only.
    """
    if not isinstance(state, GlobalState):
        state = GlobalState(adapter=state)
    if merged and any(state.base_terms.values()):
        if lora_alpha <= 0:
            raise ProtoError("a merged adapter with base terms needs lora_alpha (> 0) for PEFT's scale")
        state = GlobalState(adapter=export_state(state, lora_alpha, use_rslora))
    elif merged:
        state = GlobalState(adapter=state.adapter)
    try:
        fedlora_version = metadata.version("fedlora")
    except metadata.PackageNotFoundError:
        fedlora_version = ""
    return pb.Adapter(
        run=run, round=round, strategy=strategy, base_model=base_model, lora_alpha=lora_alpha,
        use_rslora=use_rslora, merged=merged, compression=compression_code(compression),
        layers=[factors_to_proto(name, f, compression) for name, f in state.adapter.items()],
        base_terms=[pb.LayerBaseTerms(name=name, terms=[_term_to_proto(t) for t in terms])
                    for name, terms in state.base_terms.items()],
        extras=map_to_proto(state.extras),
        fedlora_version=fedlora_version,
    )


def adapter_to_state(msg: pb.Adapter) -> GlobalState:
    """The ``GlobalState`` an ``Adapter`` holds (factors as fp32 when it was compressed)."""
    adapter = {layer.name: proto_to_factors(layer) for layer in msg.layers}
    if len(adapter) != len(msg.layers):
        raise ProtoError("Adapter names a layer twice")
    base_terms = {lt.name: [_proto_to_term(t) for t in lt.terms] for lt in msg.base_terms}
    return GlobalState(adapter=adapter, base_terms=base_terms, extras=proto_to_map(msg.extras))


def serialize_adapter(msg: pb.Adapter) -> bytes:
    """Deterministic bytes: the same adapter always hashes the same."""
    return msg.SerializeToString(deterministic=True)


def parse_adapter(data: bytes) -> pb.Adapter:
    msg = pb.Adapter()
    try:
        msg.ParseFromString(data)
    except Exception as err:  # protobuf raises DecodeError, a bare Exception subclass
        raise ProtoError(f"not a fedlora.v1.Adapter: {err}") from None
    return msg


def write_global_adapter(run_dir: str | Path, state: GlobalState, **meta: Any) -> Path:
    """Atomically replace ``<run_dir>/global_adapter.pb`` (meta: see :func:`state_to_adapter`)."""
    path = Path(run_dir) / GLOBAL_ADAPTER_FILE
    tmp = path.with_suffix(".pb.tmp")
    tmp.write_bytes(serialize_adapter(state_to_adapter(state, **meta)))
    tmp.replace(path)
    return path


# ---------------------------------------------------------------- metrics rows

_CORE = ("clients", "train_loss", "eval_loss", "agg_error", "bytes_up", "bytes_down", "seconds")
"""Columns every row of the server loop has (possibly null): always present after decoding."""
_OPTIONAL = ("epsilon", "rejected", "client_eval_loss", "eval_bytes_down", "eval_bytes_up")
_INTS = {"clients", "bytes_up", "bytes_down", "rejected", "eval_bytes_down", "eval_bytes_up"}


def row_to_summary(row: Mapping[str, Any]) -> run_pb2.RoundSummary:
    """A ``metrics.jsonl`` row as a ``RoundSummary``; unknown keys go to ``extra_json``."""
    if "round" not in row:
        raise ProtoError(f"metrics row without a 'round': {dict(row)}")
    msg = run_pb2.RoundSummary(round=int(row["round"]), strategy=str(row.get("strategy") or ""))
    for key in (*_CORE, *_OPTIONAL):
        value = row.get(key)
        if value is not None:
            setattr(msg, key, int(value) if key in _INTS else float(value))
    extra = {k: v for k, v in row.items() if k not in {"round", "strategy", *_CORE, *_OPTIONAL}}
    msg.extra_json = json.dumps(extra, sort_keys=True) if extra else ""
    return msg


def summary_to_row(msg: run_pb2.RoundSummary) -> dict[str, Any]:
    """Inverse of :func:`row_to_summary` (a null core column comes back as None)."""
    row: dict[str, Any] = {"round": msg.round, "strategy": msg.strategy}
    for key in _CORE:
        row[key] = getattr(msg, key) if msg.HasField(key) else None
    for key in _OPTIONAL:
        if msg.HasField(key):
            row[key] = getattr(msg, key)
    if msg.extra_json:
        row.update(json.loads(msg.extra_json))
    return row


# ---------------------------------------------------------------- privacy report


def _first(d: Mapping[str, Any], *keys: str, default: Any = None) -> Any:
    return next((d[k] for k in keys if d.get(k) is not None), default)


def _epsilons(entry: Mapping[str, Any], accountant: str) -> tuple[float | None, float | None]:
    """(headline ε, PRV ε) from ``epsilon`` as a number or as ``{"rdp": …, "prv": …}``."""
    eps = _first(entry, "epsilon", "eps")
    prv = _first(entry, "epsilon_prv")
    if isinstance(eps, Mapping):
        prv = eps.get("prv", prv)
        eps = eps.get(accountant, eps.get("rdp"))
    return (None if eps is None else float(eps)), (None if prv is None else float(prv))


def privacy_report_to_proto(report: Mapping[str, Any], text: str | None = None) -> run_pb2.PrivacyReport:
    """Key figures of a ``privacy_report.json`` plus the whole JSON (``text`` verbatim if given).

    Reads what :func:`fedlora.privacy.report.build_privacy_report` writes — ``mode`` (the unit),
    ``headline_accountant``, ``clients`` (``client``, ``epsilon``, ``epsilon_prv``, ``delta``,
    ``sigma``, ``q``, ``total_steps``, ``rounds_participated``, ``num_examples``), ``worst_client``
    (an object), ``client_level`` (``epsilon``, ``delta``; null for example-level runs) and
    ``statement`` — and accepts aliases (``unit``, ``accountant``, ``sample_rate``, ``steps``,
    ``noise_multiplier``, ``rounds``, ``N``; ``clients`` as an object keyed by client; ``epsilon``
    as ``{"rdp": …, "prv": …}``). An infinite ε (σ = 0) is written ``"inf"`` there and read as ∞.
    """
    accountant = str(_first(report, "headline_accountant", "accountant", default="rdp"))
    raw_clients = report.get("clients") or []
    if isinstance(raw_clients, Mapping):
        raw_clients = [{"client": k, **v} for k, v in raw_clients.items()]
    clients = []
    for entry in raw_clients:
        eps, prv = _epsilons(entry, accountant)
        c = run_pb2.ClientPrivacy(
            client=str(_first(entry, "client", "id", "node", default="")),
            epsilon=eps if eps is not None else float("nan"),
            delta=float(_first(entry, "delta", default=0.0)),
            sigma=float(_first(entry, "sigma", "noise_multiplier", default=0.0)),
            sample_rate=float(_first(entry, "sample_rate", "q", default=0.0)),
            steps=int(_first(entry, "steps", "total_steps", default=0)),
        )
        if prv is not None:
            c.epsilon_prv = prv
        if (rounds := _first(entry, "rounds", "rounds_participated")) is not None:
            c.rounds = int(rounds)
        if (n := _first(entry, "num_examples", "N")) is not None:
            c.num_examples = int(n)
        clients.append(c)
    worst = report.get("worst_client")
    worst_id = str(_first(worst, "client", "id", default="")) if isinstance(worst, Mapping) else str(worst or "")
    ranked = [c for c in clients if not math.isnan(c.epsilon)]
    if not worst_id and ranked:
        worst_id = max(ranked, key=lambda c: c.epsilon).client
    by_id = {c.client: c for c in clients}
    client_level = report.get("client_level") or {}
    if worst_id in by_id:
        worst_eps, delta = by_id[worst_id].epsilon, by_id[worst_id].delta
    else:
        worst_eps = _epsilons(client_level, accountant)[0] if client_level else None
        worst_eps = worst_eps if worst_eps is not None else _first(report, "worst_epsilon", default=float("nan"))
        delta = _first(client_level, "delta", default=_first(report, "delta", default=0.0))
    return run_pb2.PrivacyReport(
        unit=str(_first(report, "mode", "unit", default="")), accountant=accountant, clients=clients,
        worst_client=worst_id, worst_epsilon=float(worst_eps), delta=float(delta),
        statement=str(report.get("statement") or ""),
        report_json=text if text is not None else json.dumps(report, indent=2, default=str),
    )
