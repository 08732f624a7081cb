"""AdapterService: a real gRPC server on a free loopback port and a real client, plaintext, TLS and
mutual TLS (certificates generated here with ``cryptography``)."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedlora.commands.serve import (
    TLSFiles,
    assemble_chunks,
    connect,
    fetch_adapter,
    fetch_global_state,
    fetch_privacy_report,
    fetch_round_metrics,
    make_server,
    serve_main,
)
from fedlora.adapters import LoraFactors
from fedlora.aggregation import GlobalState
from fedlora.protocol.compression import roundtrip
from fedlora.config import AdapterConfig
from fedlora.model.peft_export import export_state, save_peft_adapter
from fedlora.proto.v1 import adapter_service_pb2, adapter_service_pb2_grpc
from fedlora.protocol.proto_io import ProtoError, write_global_adapter

ALPHA = 16.0
ROWS = [
    {"round": 0, "strategy": "fedex", "clients": 0, "train_loss": None, "eval_loss": 2.5, "agg_error": None,
     "bytes_up": 0, "bytes_down": 0, "seconds": 0.0},
    {"round": 1, "strategy": "fedex", "clients": 2, "rejected": 0, "bytes_down": 10, "bytes_up": 20,
     "train_loss": 2.3, "eval_loss": 2.2, "agg_error": 1e-7, "seconds": 1.5},
    {"round": 2, "strategy": "fedex", "clients": 2, "rejected": 1, "bytes_down": 10, "bytes_up": 20,
     "train_loss": 2.1, "eval_loss": 2.0, "agg_error": 2e-7, "seconds": 1.25},
]


def global_state() -> GlobalState:
    g = torch.Generator().manual_seed(0)
    adapter = {f"model.layers.{i}.q_proj": LoraFactors(torch.randn(4, 48, generator=g), torch.randn(40, 4, generator=g), ALPHA / 4)
               for i in range(3)}
    base = {"model.layers.0.q_proj": [LoraFactors(torch.randn(6, 48, generator=g), torch.randn(40, 6, generator=g), 1.0)]}
    return GlobalState(adapter, base, {"round": 2, "rank_scales": {4: ALPHA / 4}})


def bitwise_equal(x: dict[str, LoraFactors], y: dict[str, LoraFactors]) -> bool:
    return list(x) == list(y) and all(
        torch.equal(x[n].A.view(torch.int32), y[n].A.view(torch.int32))
        and torch.equal(x[n].B.view(torch.int32), y[n].B.view(torch.int32)) and x[n].scale == y[n].scale for n in x)


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run-a"
    run.mkdir()
    write_global_adapter(run, global_state(), run="run-a", round=2, strategy="fedex", lora_alpha=ALPHA)
    text = "".join(json.dumps(r) + "\n" for r in ROWS)
    (run / "metrics.jsonl").write_text(text + '{"round": 3, "strat')  # round 3 still being written
    return run


@pytest.fixture
def server(run_dir):
    srv, port = make_server({"run-a": run_dir}, "127.0.0.1:0", chunk_size=4096)
    yield f"127.0.0.1:{port}"
    srv.stop(grace=None)


def test_adapter_streams_in_chunks_and_reassembles_bit_identically(server):
    # Execute: the raw stream, then the helper
    with connect(server) as channel:
        stub = adapter_service_pb2_grpc.AdapterServiceStub(channel)
        chunks = list(stub.GetLatestAdapter(adapter_service_pb2.GetAdapterRequest(run="run-a"), timeout=10))
    state = fetch_global_state(server, "run-a")
    # Assert
    assert len(chunks) > 1 and [c.index for c in chunks] == list(range(chunks[0].total))
    assert all(len(c.data) == 4096 for c in chunks[:-1]) and chunks[0].round == 2
    expected = global_state()
    assert bitwise_equal(state.adapter, expected.adapter)
    layer = "model.layers.0.q_proj"
    assert bitwise_equal({"t": state.base_terms[layer][0]}, {"t": expected.base_terms[layer][0]})
    assert state.extras == expected.extras


def test_inference_view_is_the_merged_lora(server):
    # The only run is served when the request names none; base terms are folded in exactly as PEFT export does.
    got = fetch_adapter(server)
    assert bitwise_equal(got, export_state(global_state(), ALPHA, False))


@pytest.mark.parametrize("scheme", ["fp16", "int8"])
def test_compressed_adapter_over_the_wire(server, scheme):
    got = fetch_adapter(server, "run-a", compression=scheme)
    assert bitwise_equal(got, roundtrip(export_state(global_state(), ALPHA, False), scheme))


def test_round_metrics_all_and_since_round(server):
    assert fetch_round_metrics(server, "run-a") == ROWS  # the unfinished round-3 line is skipped
    assert fetch_round_metrics(server, "run-a", since_round=1) == ROWS[1:]
    assert fetch_round_metrics(server, "run-a", since_round=5) == []


def test_privacy_report_absent_then_present(server, run_dir):
    # Absent: NOT_FOUND with a message that says why
    with pytest.raises(grpc.RpcError) as info:
        fetch_privacy_report(server, "run-a")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no privacy report" in info.value.details() and "privacy_report.json" in info.value.details()
    # Present
    report = {"unit": "example", "clients": [{"client": "0", "epsilon": 5.63, "delta": 1e-5, "sigma": 1.1,
                                              "q": 0.01, "steps": 10000}], "statement": "ε ≤ 5.63 per client"}
    (run_dir / "privacy_report.json").write_text(json.dumps(report))
    got = fetch_privacy_report(server, "run-a")
    assert (got.unit, got.worst_client, got.worst_epsilon, got.clients[0].steps) == ("example", "0", 5.63, 10000)
    assert json.loads(got.report_json) == report


def test_unknown_run_and_missing_adapter(server, run_dir):
    with pytest.raises(grpc.RpcError) as info:
        fetch_adapter(server, "run-b")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "run-a" in info.value.details()
    (run_dir / "global_adapter.pb").unlink()
    with pytest.raises(grpc.RpcError) as info:
        fetch_adapter(server, "run-a")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "no adapter yet" in info.value.details()


def test_peft_export_is_served_when_there_is_no_global_adapter_pb(tmp_path):
    # Prepare: a finished run with only the PEFT export
    state = export_state(global_state(), ALPHA, False)
    save_peft_adapter(state, AdapterConfig(rank=4, alpha=ALPHA), tmp_path / "adapter", base_model="tiny")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    srv, port = make_server({"done": tmp_path}, "127.0.0.1:0")
    try:
        # Execute
        got = fetch_adapter(f"127.0.0.1:{port}")
    finally:
        srv.stop(grace=None)
    # Assert: same factors and scales (PEFT stores layers sorted by name)
    assert bitwise_equal(dict(sorted(got.items())), dict(sorted(state.items())))


def test_a_corrupted_stream_is_detected():
    data = b"x" * 10
    good = [adapter_service_pb2.AdapterChunk(index=i, total=2, data=data[5 * i:5 * i + 5], total_bytes=10,
                                             sha256=hashlib.sha256(data).digest()) for i in range(2)]
    assert assemble_chunks(iter(good)) == data
    bad = [good[0], adapter_service_pb2.AdapterChunk(**{**{f.name: v for f, v in good[1].ListFields()}, "data": b"yyyyy"})]
    with pytest.raises(ProtoError, match="SHA-256"):
        assemble_chunks(iter(bad))
    with pytest.raises(ProtoError, match="ended after 1 of 2"):
        assemble_chunks(iter(good[:1]))


# ---------------------------------------------------------------- TLS


def _cert(subject: str, key, issuer_name, issuer_key, *, ca: bool, usage=None, sans=()):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path, cert=None, key=None):
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, all signed by it;
    plus a second, unrelated CA."""
    d = tmp_path_factory.mktemp("pki")
    out = {}
    for ca_name in ("ca", "other_ca"):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fedlora test {ca_name}")])
        cert = _cert(f"fedlora test {ca_name}", key, name, key, ca=True)
        out[ca_name] = (cert, key)
        _write(d / f"{ca_name}.pem", cert=cert)
    ca_cert, ca_key = out["ca"]
    for who, usage, sans in (("server", ExtendedKeyUsageOID.SERVER_AUTH,
                              (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")))),
                             ("client", ExtendedKeyUsageOID.CLIENT_AUTH, ())):
        key = ec.generate_private_key(ec.SECP256R1())
        _write(d / f"{who}.pem", cert=_cert(who, key, ca_cert.subject, ca_key, ca=False, usage=usage, sans=sans))
        _write(d / f"{who}.key", key=key)
    return d


def test_tls_with_the_ca_works_and_plaintext_or_a_wrong_ca_fails(run_dir, pki):
    srv, port = make_server({"run-a": run_dir}, "127.0.0.1:0", tls=TLSFiles(pki / "server.pem", pki / "server.key"))
    address = f"127.0.0.1:{port}"
    try:
        assert fetch_round_metrics(address, root_cert=pki / "ca.pem") == ROWS
        assert bitwise_equal(fetch_global_state(address, root_cert=pki / "ca.pem").adapter, global_state().adapter)
        with pytest.raises(grpc.RpcError) as plain:
            fetch_round_metrics(address, timeout=5)
        with pytest.raises(grpc.RpcError) as wrong_ca:
            fetch_round_metrics(address, root_cert=pki / "other_ca.pem", timeout=5)
    finally:
        srv.stop(grace=None)
    assert plain.value.code() == grpc.StatusCode.UNAVAILABLE
    assert wrong_ca.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate(run_dir, pki):
    tls = TLSFiles(pki / "server.pem", pki / "server.key", client_ca=pki / "ca.pem")
    srv, port = make_server({"run-a": run_dir}, "127.0.0.1:0", tls=tls)
    address = f"127.0.0.1:{port}"
    try:
        got = fetch_round_metrics(address, root_cert=pki / "ca.pem", client_cert=pki / "client.pem",
                                  client_key=pki / "client.key")
        with pytest.raises(grpc.RpcError) as no_cert:
            fetch_round_metrics(address, root_cert=pki / "ca.pem", timeout=5)
    finally:
        srv.stop(grace=None)
    assert got == ROWS
    assert no_cert.value.code() == grpc.StatusCode.UNAVAILABLE


def test_serve_cli_refuses_half_a_tls_configuration(run_dir, pki, capsys):
    with pytest.raises(SystemExit):
        serve_main([str(run_dir), "--tls-cert", str(pki / "server.pem")])
    assert "--tls-cert and --tls-key go together" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="does not exist"):
        serve_main([str(run_dir / "nope")])
