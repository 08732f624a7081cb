"""``fedlora serve``: a gRPC AdapterService over run directories, and the client helpers.

    fedlora serve RUN_DIR [NAME=RUN_DIR …] --port 50061 [--tls-cert C --tls-key K [--tls-client-ca CA]]

Serves, read-only, for each run (protos/fedlora/v1/adapter_service.proto, docs/protos.md):

- the latest global adapter: ``<run_dir>/global_adapter.pb`` (written after every round by
  :func:`fedlora.protocol.proto_io.write_global_adapter`) if present, else the final PEFT export
  ``<run_dir>/adapter/`` (``adapter_model.safetensors`` + ``adapter_config.json``). It is
  serialised as one ``fedlora.v1.Adapter`` and streamed in chunks (1 MiB by default) that each
  carry index/total and the SHA-256 of the whole; on request compressed (fp16/bf16/int8) and/or
  merged into one plain LoRA per layer;
- the rows of ``metrics.jsonl`` (all, or from round k on);
- ``privacy_report.json``, NOT_FOUND when the run has none.

Files are re-read on every request, so a running federation's newest round is what is served; the
server loop replaces ``global_adapter.pb`` atomically, and an unfinished last line of
``metrics.jsonl`` is skipped. TLS: a server certificate and key; with ``--tls-client-ca`` clients
must also present a certificate signed by that CA (mutual TLS).

Client side: :func:`fetch_adapter` (an inference server's call: one LoRA per layer, fp32),
:func:`fetch_global_state`, :func:`fetch_round_metrics`, :func:`fetch_privacy_report`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from fedlora.adapters.lora import lora_scale
from fedlora.adapters.state import AdapterState, LoraFactors
from fedlora.aggregation.common import GlobalState
from fedlora.protocol.compression import SCHEMES
from fedlora.proto.v1 import adapter_pb2, adapter_service_pb2, adapter_service_pb2_grpc, run_pb2
from fedlora.protocol.proto_io import (
    ProtoError,
    adapter_to_state,
    compression_code,
    compression_name,
    parse_adapter,
    privacy_report_to_proto,
    row_to_summary,
    serialize_adapter,
    state_to_adapter,
    summary_to_row,
)
from fedlora.rundir.files import (
    ADAPTER_DIR,
    GLOBAL_ADAPTER_FILE,
    METRICS_FILE,
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    PRIVACY_REPORT_JSON,
    RunDirError,
    read_metrics,
)

DEFAULT_PORT = 50061
DEFAULT_CHUNK = 1 << 20  # 1 MiB: well under gRPC's 4 MiB default message limit
MAX_CHUNK = 3 << 20
_PEFT_PREFIX, _PEFT_A, _PEFT_B = "base_model.model.", ".lora_A.weight", ".lora_B.weight"


class RunError(Exception):
    """A request cannot be answered from a run directory; carries the gRPC status to send."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- reading a run directory


def read_peft_adapter(directory: Path) -> tuple[AdapterState, dict[str, Any]]:
    """A PEFT LoRA export (as :func:`fedlora.model.peft_export.save_peft_adapter` writes it) as an
    adapter state, scales from ``lora_alpha``/``alpha_pattern``/``use_rslora`` and each layer's rank."""
    from safetensors.torch import load_file

    config = json.loads((directory / PEFT_CONFIG_FILE).read_text())
    tensors = load_file(str(directory / PEFT_WEIGHTS_FILE))
    names = sorted(k[len(_PEFT_PREFIX):-len(_PEFT_A)] for k in tensors
                   if k.startswith(_PEFT_PREFIX) and k.endswith(_PEFT_A))
    state: AdapterState = {}
    for name in names:
        a, b = tensors[f"{_PEFT_PREFIX}{name}{_PEFT_A}"], tensors.get(f"{_PEFT_PREFIX}{name}{_PEFT_B}")
        if b is None:
            raise ProtoError(f"{directory}: layer {name} has lora_A but no lora_B")
        alpha = next((v for p, v in config.get("alpha_pattern", {}).items() if re.search(rf"(^|\.){p}$", name)),
                     config["lora_alpha"])
        state[name] = LoraFactors(a, b, lora_scale(alpha, a.shape[0], bool(config.get("use_rslora", False))))
    return state, config


def metrics_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The complete rows of ``metrics.jsonl`` (a last line still being written is skipped; none
    when the run has not written the file yet)."""
    try:
        return read_metrics(run_dir, live=True)
    except RunDirError as err:
        raise RunError(grpc.StatusCode.DATA_LOSS, str(err)) from None


def load_adapter_bytes(name: str, run_dir: Path, compression: str, merged: bool) -> tuple[bytes, int]:
    """The serialised ``Adapter`` to send and its round."""
    stored = run_dir / GLOBAL_ADAPTER_FILE
    peft_dir = run_dir / ADAPTER_DIR
    if stored.is_file():
        data = stored.read_bytes()
        try:
            msg = parse_adapter(data)
            if compression == "none" and not merged:
                return data, msg.round  # as the server loop wrote it
            state = adapter_to_state(msg)
        except ProtoError as err:
            raise RunError(grpc.StatusCode.DATA_LOSS, f"{stored}: {err}") from None
        try:
            out = state_to_adapter(state, compression=compression, merged=merged, run=msg.run or name,
                                   round=msg.round, strategy=msg.strategy, base_model=msg.base_model,
                                   lora_alpha=msg.lora_alpha, use_rslora=msg.use_rslora)
        except ValueError as err:  # ProtoError (merge without lora_alpha), CompressionError (fp16 overflow)
            raise RunError(grpc.StatusCode.FAILED_PRECONDITION, f"run {name!r}: {err}") from None
        return serialize_adapter(out), out.round
    if (peft_dir / PEFT_WEIGHTS_FILE).is_file():
        try:
            state, config = read_peft_adapter(peft_dir)
        except (OSError, KeyError, ValueError) as err:
            raise RunError(grpc.StatusCode.DATA_LOSS, f"{peft_dir}: unreadable PEFT adapter ({err})") from None
        rows = metrics_rows(run_dir)
        try:
            out = state_to_adapter(
                state, compression=compression, merged=True, run=name,
                round=max((int(r["round"]) for r in rows), default=0),
                strategy=str(rows[-1].get("strategy", "")) if rows else "",
                base_model=str(config.get("base_model_name_or_path") or ""), lora_alpha=float(config["lora_alpha"]),
                use_rslora=bool(config.get("use_rslora", False)),
            )
        except ValueError as err:  # CompressionError: e.g. fp16 overflow
            raise RunError(grpc.StatusCode.FAILED_PRECONDITION, f"run {name!r}: {err}") from None
        return serialize_adapter(out), out.round
    raise RunError(grpc.StatusCode.NOT_FOUND,
                   f"run {name!r} has no adapter yet: neither {stored} nor "
                   f"{peft_dir / PEFT_WEIGHTS_FILE} exists")


# ---------------------------------------------------------------- the service


class AdapterServicer(adapter_service_pb2_grpc.AdapterServiceServicer):
    """Answers from run directories; holds no state besides the run list."""

    def __init__(self, runs: Mapping[str, Path], chunk_size: int = DEFAULT_CHUNK) -> None:
        if not 1 <= chunk_size <= MAX_CHUNK:
            raise ValueError(f"chunk_size={chunk_size} must lie in [1, {MAX_CHUNK}]")
        self.runs = {name: Path(path) for name, path in runs.items()}
        self.chunk_size = chunk_size

    def _run(self, name: str) -> tuple[str, Path]:
        if not name and len(self.runs) == 1:
            return next(iter(self.runs.items()))
        if not name:
            raise RunError(grpc.StatusCode.INVALID_ARGUMENT, f"this server serves runs {sorted(self.runs)}; name one")
        if name not in self.runs:
            raise RunError(grpc.StatusCode.NOT_FOUND, f"no run {name!r} here; this server serves {sorted(self.runs)}")
        return name, self.runs[name]

    def GetLatestAdapter(self, request, context) -> Iterator[adapter_service_pb2.AdapterChunk]:
        try:
            scheme = compression_name(request.compression)
            name, run_dir = self._run(request.run)
            data, rnd = load_adapter_bytes(name, run_dir, scheme, request.merged)
        except ProtoError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except RunError as err:
            context.abort(err.code, str(err))
        digest = hashlib.sha256(data).digest()
        total = max(1, -(-len(data) // self.chunk_size))
        for index in range(total):
            piece = data[index * self.chunk_size:(index + 1) * self.chunk_size]
            yield adapter_service_pb2.AdapterChunk(index=index, total=total, data=piece, total_bytes=len(data),
                                                   sha256=digest, round=rnd)

    def GetRoundMetrics(self, request, context) -> adapter_service_pb2.RoundMetrics:
        try:
            name, run_dir = self._run(request.run)
            rows = [r for r in metrics_rows(run_dir) if int(r["round"]) >= request.since_round]
            return adapter_service_pb2.RoundMetrics(run=name, rounds=[row_to_summary(r) for r in rows])
        except RunError as err:
            context.abort(err.code, str(err))
        except (KeyError, ValueError, TypeError) as err:
            context.abort(grpc.StatusCode.DATA_LOSS, f"{METRICS_FILE} of run {request.run!r}: {err}")

    def GetPrivacyReport(self, request, context) -> run_pb2.PrivacyReport:
        try:
            name, run_dir = self._run(request.run)
            path = run_dir / PRIVACY_REPORT_JSON
            if not path.is_file():
                raise RunError(grpc.StatusCode.NOT_FOUND,
                               f"run {name!r} has no privacy report ({path} does not exist); runs without "
                               "differential privacy (dp.mode=none) do not write one")
            text = path.read_text()
            return privacy_report_to_proto(json.loads(text), text)
        except RunError as err:
            context.abort(err.code, str(err))
        except (ValueError, TypeError, AttributeError) as err:
            context.abort(grpc.StatusCode.DATA_LOSS, f"privacy report of run {request.run!r}: {err}")


@dataclass(frozen=True)
class TLSFiles:
    """PEM files: the server's certificate chain and key; with ``client_ca``, mutual TLS."""

    cert: Path
    key: Path
    client_ca: Path | None = None


def server_credentials(tls: TLSFiles) -> grpc.ServerCredentials:
    client_ca = tls.client_ca.read_bytes() if tls.client_ca else None
    return grpc.ssl_server_credentials([(tls.key.read_bytes(), tls.cert.read_bytes())],
                                       root_certificates=client_ca, require_client_auth=client_ca is not None)


def make_server(
    runs: Mapping[str, str | Path],
    address: str = f"127.0.0.1:{DEFAULT_PORT}",
    *,
    tls: TLSFiles | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    max_workers: int = 4,
) -> tuple[grpc.Server, int]:
    """A started server and the port it bound (``address`` may end in ``:0`` for a free port)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers))
    adapter_service_pb2_grpc.add_AdapterServiceServicer_to_server(
        AdapterServicer({n: Path(p) for n, p in runs.items()}, chunk_size), server)
    port = server.add_secure_port(address, server_credentials(tls)) if tls else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    server.start()
    return server, port


# ---------------------------------------------------------------- the client helpers


def _pem(value: bytes | str | Path | None) -> bytes | None:
    """PEM bytes as given, or read from a path."""
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def connect(
    address: str,
    *,
    root_cert: bytes | str | Path | None = None,
    client_cert: bytes | str | Path | None = None,
    client_key: bytes | str | Path | None = None,
    server_name: str | None = None,
) -> grpc.Channel:
    """A channel: TLS when ``root_cert`` (the CA that signed the server's certificate) is given,
    with a client certificate for mutual TLS; else plaintext. ``server_name`` overrides the host
    name checked against the certificate."""
    if root_cert is None:
        return grpc.insecure_channel(address)
    creds = grpc.ssl_channel_credentials(_pem(root_cert), _pem(client_key), _pem(client_cert))
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(address, creds, options=options)


def assemble_chunks(chunks: Iterator[adapter_service_pb2.AdapterChunk]) -> bytes:
    """Concatenate a GetLatestAdapter stream; raise :class:`ProtoError` unless every chunk came,
    in order, and the whole has the announced length and SHA-256."""
    parts, first = [], None
    for chunk in chunks:
        first = first or chunk
        if chunk.index != len(parts) or chunk.total != first.total or chunk.sha256 != first.sha256:
            raise ProtoError(f"chunk {chunk.index}/{chunk.total} out of sequence after {len(parts)} chunks")
        parts.append(chunk.data)
    if first is None or len(parts) != first.total:
        raise ProtoError(f"adapter stream ended after {len(parts)} of {first.total if first else '?'} chunks")
    data = b"".join(parts)
    if len(data) != first.total_bytes or hashlib.sha256(data).digest() != first.sha256:
        raise ProtoError(f"adapter corrupted in transit: {len(data)} bytes (expected {first.total_bytes}) "
                         "or SHA-256 mismatch")
    return data


def fetch_adapter_message(
    address: str, run: str = "", *, compression: str = "none", merged: bool = False, timeout: float = 60.0, **tls: Any
) -> adapter_pb2.Adapter:
    """The run's latest ``Adapter`` message, checked (``tls``: see :func:`connect`)."""
    request = adapter_service_pb2.GetAdapterRequest(run=run, compression=compression_code(compression), merged=merged)
    with connect(address, **tls) as channel:
        stub = adapter_service_pb2_grpc.AdapterServiceStub(channel)
        return parse_adapter(assemble_chunks(stub.GetLatestAdapter(request, timeout=timeout)))


def fetch_adapter(
    address: str, run: str = "", *, compression: str = "none", root_cert: bytes | str | Path | None = None,
    timeout: float = 60.0, **tls: Any,
) -> AdapterState:
    """What an inference server loads: one plain LoRA per layer equal to the run's whole update
    (base terms folded in), as fp32 factors."""
    msg = fetch_adapter_message(address, run, compression=compression, merged=True, timeout=timeout,
                                root_cert=root_cert, **tls)
    return adapter_to_state(msg).adapter


def fetch_global_state(address: str, run: str = "", *, timeout: float = 60.0, **tls: Any) -> GlobalState:
    """The server's full state (adapter, base terms, extras), exact."""
    return adapter_to_state(fetch_adapter_message(address, run, merged=False, timeout=timeout, **tls))


def fetch_round_metrics(
    address: str, run: str = "", *, since_round: int = 0, timeout: float = 30.0, **tls: Any
) -> list[dict]:
    """``metrics.jsonl`` rows with round ≥ ``since_round``."""
    request = adapter_service_pb2.GetRoundMetricsRequest(run=run, since_round=since_round)
    with connect(address, **tls) as channel:
        reply = adapter_service_pb2_grpc.AdapterServiceStub(channel).GetRoundMetrics(request, timeout=timeout)
    return [summary_to_row(r) for r in reply.rounds]


def fetch_privacy_report(address: str, run: str = "", *, timeout: float = 30.0, **tls: Any) -> run_pb2.PrivacyReport:
    """The run's ``PrivacyReport`` (``json.loads(report.report_json)`` for the whole report)."""
    request = adapter_service_pb2.GetPrivacyReportRequest(run=run)
    with connect(address, **tls) as channel:
        return adapter_service_pb2_grpc.AdapterServiceStub(channel).GetPrivacyReport(request, timeout=timeout)


# ---------------------------------------------------------------- the CLI


def parse_runs(specs: Sequence[str]) -> dict[str, Path]:
    """``DIR`` (named after the directory) or ``NAME=DIR``."""
    runs: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        directory = Path(path if sep else spec)
        name = name if sep else directory.resolve().name
        if not directory.is_dir():
            raise SystemExit(f"fedlora serve: run directory {directory} does not exist")
        if name in runs:
            raise SystemExit(f"fedlora serve: two runs are named {name!r}; give one as NAME=DIR")
        runs[name] = directory
    return runs


def serve_main(argv: Sequence[str]) -> None:
    """``fedlora serve RUN_DIR … --port P [--tls-cert C --tls-key K [--tls-client-ca CA]]``."""
    parser = argparse.ArgumentParser(prog="fedlora serve", description="Serve runs' adapters, metrics and "
                                     "privacy reports over gRPC (fedlora.v1.AdapterService).")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directory, or NAME=RUN_DIR")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for all; use TLS then)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--tls-cert", type=Path, help="server certificate chain (PEM)")
    parser.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    parser.add_argument("--tls-client-ca", type=Path, help="CA of client certificates: require mutual TLS")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK, help="adapter stream chunk size in bytes")
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args(list(argv))
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key")
    for path in (args.tls_cert, args.tls_key, args.tls_client_ca):
        if path is not None and not path.is_file():
            parser.error(f"{path} does not exist")
    tls = TLSFiles(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    runs = parse_runs(args.runs)
    server, port = make_server(runs, f"{args.host}:{args.port}", tls=tls, chunk_size=args.chunk_size,
                               max_workers=args.workers)
    mode = "mutual TLS" if tls and tls.client_ca else "TLS" if tls else "plaintext (no --tls-cert)"
    print(f"fedlora serve: runs {sorted(runs)} on {args.host}:{port}, {mode}; "
          f"compression on request: {', '.join(SCHEMES)}; Ctrl-C stops", flush=True)
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        server.stop(grace=2.0).wait()
