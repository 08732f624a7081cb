"""fedlora.v1 schema: generated code is current; adapters, metrics rows and privacy reports
round-trip through the messages (fp32 tensors bit for bit)."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

from fedlora.adapters import LoraFactors
from fedlora.aggregation import GlobalState
from fedlora.aggregation.terms import DenseTerm
from fedlora.protocol.compression import roundtrip
from fedlora.model.peft_export import export_state
from fedlora.proto import generate
from fedlora.proto.v1 import adapter_pb2 as pb
from fedlora.protocol.proto_io import (
    ProtoError,
    adapter_to_state,
    parse_adapter,
    privacy_report_to_proto,
    proto_to_tensor,
    row_to_summary,
    serialize_adapter,
    state_to_adapter,
    summary_to_row,
    tensor_to_proto,
    value_to_proto,
    write_global_adapter,
)

SHAPES = {"model.layers.0.q_proj": (24, 10, 4), "model.layers.0.down_proj": (7, 31, 4), "lm.odd": (5, 3, 2)}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def make_state(seed: int = 0) -> GlobalState:
    g = torch.Generator().manual_seed(seed)
    adapter = {n: LoraFactors(torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g) * 1e-3, 16 / r)
               for n, (d_out, d_in, r) in SHAPES.items()}
    first = next(iter(adapter))
    # values that a lossy path would change: -0.0, a subnormal, the largest float32
    adapter[first].A[0, :3] = torch.tensor([-0.0, 1e-45, 3.4028235e38])
    d_out, d_in, _ = SHAPES[first]
    base_terms = {first: [LoraFactors(torch.randn(6, d_in, generator=g), torch.randn(d_out, 6, generator=g), 1.0),
                          DenseTerm(torch.randn(d_out, d_in, generator=g), 0.5)]}
    extras = {
        "round": 3, "seed": 7, "min_rank": None, "lorafair_method": "ridge", "lam": 0.1, "flag": True,
        "rank_scales": {4: 4.0, 2: 8.0},
        "sb_frame": {first: {"B": torch.randn(d_out, 4, generator=g), "A": torch.randn(4, d_in, generator=g)}},
        "sb_core": {first: LoraFactors(torch.randn(4, 4, generator=g), torch.eye(4), 4.0)},
        "history": [1, 2.5, "x"],
        "mixed_dtypes": {"bf16": torch.randn(3, 2, generator=g).bfloat16(), "fp16": torch.randn(2, generator=g).half(),
                         "i64": torch.arange(5), "mask": torch.tensor([True, False]), "f64": torch.randn(2, 2, generator=g).double()},
    }
    return GlobalState(adapter=adapter, base_terms=base_terms, extras=extras)


def assert_same_tree(x, y):
    """Equal values, types and dtypes; float tensors compared bit for bit."""
    if isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(bits(x), bits(y)) if x.dtype == torch.float32 else torch.equal(x, y)
    elif isinstance(x, tuple):  # LoraFactors, DenseTerm
        assert type(x) is type(y) and len(x) == len(y)
        for a, b in zip(x, y):
            assert_same_tree(a, b)
    elif isinstance(x, dict):
        assert list(x) == list(y)
        for k in x:
            assert_same_tree(x[k], y[k])
    elif isinstance(x, list):
        assert len(x) == len(y)
        for a, b in zip(x, y):
            assert_same_tree(a, b)
    else:
        assert type(x) is type(y) and x == y


def test_generated_code_is_not_stale():
    # Regenerates protos/ into a temp dir with grpcio-tools and diffs against fedlora/proto/v1/.
    stale = generate.stale_files()
    assert stale == [], f"generated code is stale ({stale}); run: python -m fedlora.proto.generate"


def test_staleness_check_catches_a_schema_change(tmp_path):
    # Prepare: a copy of protos/ with one more field
    shutil.copytree(generate.PROTO_ROOT, tmp_path / "protos")
    proto = tmp_path / "protos" / "fedlora" / "v1" / "run.proto"
    proto.write_text(proto.read_text().replace("string extra_json = 15;", "string extra_json = 15;\n  uint32 new_field = 16;"))
    # Execute / Assert
    assert generate.stale_files(proto_root=tmp_path / "protos") == ["run_pb2.py", "run_pb2.pyi"]


def test_generated_modules_import_inside_our_package():
    from fedlora.proto.v1 import adapter_service_pb2, adapter_service_pb2_grpc

    assert pb.Adapter.__module__ == "fedlora.proto.v1.adapter_pb2"
    assert pb.DESCRIPTOR.name == "fedlora/v1/adapter.proto"  # canonical file name for other languages
    assert adapter_service_pb2.DESCRIPTOR.services_by_name["AdapterService"].full_name == "fedlora.v1.AdapterService"
    assert hasattr(adapter_service_pb2_grpc, "AdapterServiceStub")


def test_global_state_round_trips_bit_identically():
    # Prepare
    state = make_state()
    # Execute
    msg = parse_adapter(serialize_adapter(state_to_adapter(state, run="r", round=3, strategy="fedex", lora_alpha=16)))
    back = adapter_to_state(msg)
    # Assert
    assert_same_tree(state.adapter, back.adapter)
    assert_same_tree(state.base_terms, back.base_terms)
    assert_same_tree(state.extras, back.extras)
    assert (msg.run, msg.round, msg.strategy, msg.lora_alpha, msg.merged) == ("r", 3, "fedex", 16.0, False)
    assert msg.layers[0].a.data[:12] == torch.tensor([-0.0, 1e-45, 3.4028235e38]).numpy().astype("<f4").tobytes()


def test_serialisation_is_deterministic():
    a = serialize_adapter(state_to_adapter(make_state(), round=1))
    b = serialize_adapter(state_to_adapter(make_state(), round=1))
    assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest()


@pytest.mark.parametrize("scheme", ["fp16", "bf16", "int8"])
def test_compressed_adapter_decodes_to_the_compressed_values(scheme):
    # Prepare
    g = torch.Generator().manual_seed(3)
    adapter = {f"l{i}": LoraFactors(torch.randn(8, 96, generator=g), torch.randn(64, 8, generator=g), 2.0) for i in range(3)}
    # Execute
    exact = serialize_adapter(state_to_adapter(adapter))
    packed = serialize_adapter(state_to_adapter(adapter, compression=scheme))
    back = adapter_to_state(parse_adapter(packed)).adapter
    # Assert: what the receiver gets is exactly compression.roundtrip, at about 1/2 (1/4) of the bytes
    assert_same_tree(roundtrip(adapter, scheme), back)
    assert len(packed) < (0.52 if scheme != "int8" else 0.28) * len(exact)


def test_merged_view_is_the_peft_export():
    state = make_state()
    msg = state_to_adapter(state, merged=True, lora_alpha=16.0)
    assert msg.merged and not msg.base_terms and not msg.extras.entries
    assert_same_tree(export_state(state, 16.0, False), adapter_to_state(msg).adapter)
    with pytest.raises(ProtoError, match="lora_alpha"):
        state_to_adapter(state, merged=True)


def test_malformed_messages_are_refused():
    t = tensor_to_proto(torch.ones(3, 4))
    t.data = t.data[:-4]
    with pytest.raises(ProtoError, match="needs 48 bytes; got 44"):
        proto_to_tensor(t)
    with pytest.raises(ProtoError, match=r"extras\['x'\] is a set"):
        value_to_proto({"x": {1, 2}})
    bad = state_to_adapter({"l": LoraFactors(torch.ones(2, 3), torch.ones(4, 2), 1.0)})
    bad.layers[0].rank = 3
    with pytest.raises(ProtoError, match="rank 3"):
        adapter_to_state(bad)
    with pytest.raises(ProtoError, match="not a fedlora.v1.Adapter"):
        parse_adapter(b"\xff\xff\xff")


def test_write_global_adapter_replaces_the_file(tmp_path):
    write_global_adapter(tmp_path, make_state(0), round=1)
    path = write_global_adapter(tmp_path, make_state(1), round=2)
    msg = parse_adapter(path.read_bytes())
    assert msg.round == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["global_adapter.pb"]
    assert_same_tree(make_state(1).adapter, adapter_to_state(msg).adapter)


ROWS = [  # as fedlora_server.loop writes them
    {"round": 0, "strategy": "fedavg", "clients": 0, "train_loss": None, "eval_loss": 2.5, "agg_error": None,
     "bytes_up": 0, "bytes_down": 0, "seconds": 0.0},
    {"round": 1, "strategy": "fedavg", "clients": 2, "rejected": 1, "bytes_down": 123456, "bytes_up": 98765,
     "train_loss": 2.25, "eval_loss": 2.125, "agg_error": 0.0123, "client_eval_loss": 2.2,
     "eval_bytes_down": 5, "eval_bytes_up": 6, "seconds": 3.5},
    {"round": 2, "strategy": "fedavg", "clients": 1, "rejected": 0, "bytes_down": 1, "bytes_up": 2, "train_loss": None,
     "eval_loss": None, "agg_error": None, "seconds": 1.25, "epsilon": 3.2, "gsm8k": {"correct": 3, "total": 8}},
]


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"round{r['round']}")
def test_metrics_rows_round_trip(row):
    msg = run_summary = row_to_summary(row)
    back = summary_to_row(type(run_summary).FromString(msg.SerializeToString()))
    assert back == row
    assert {k: type(v) for k, v in back.items()} == {k: type(v) for k, v in row.items()}


def test_privacy_report_key_figures():
    # Prepare: an example-level report with two clients, ε given per accountant for one of them
    report = {
        "unit": "example", "accountant": "rdp", "statement": "Each client's examples are protected …",
        "clients": [
            {"client": "0", "epsilon": {"rdp": 5.63, "prv": 5.2}, "delta": 1e-5, "noise_multiplier": 1.1,
             "sample_rate": 0.01, "total_steps": 10000, "rounds_participated": 20, "num_examples": 5000},
            {"client": "1", "epsilon": 7.2, "delta": 1e-5, "sigma": 0.8, "q": 0.02, "steps": 1000},
        ],
    }
    text = json.dumps(report)
    # Execute
    msg = privacy_report_to_proto(report, text)
    # Assert
    assert (msg.unit, msg.accountant, msg.worst_client, msg.worst_epsilon, msg.delta) == ("example", "rdp", "1", 7.2, 1e-5)
    c0, c1 = msg.clients
    assert (c0.epsilon, c0.epsilon_prv, c0.sigma, c0.sample_rate, c0.steps, c0.rounds, c0.num_examples) == (
        5.63, 5.2, 1.1, 0.01, 10000, 20, 5000)
    assert (c1.epsilon, c1.sigma, c1.sample_rate, c1.steps, c1.HasField("epsilon_prv")) == (7.2, 0.8, 0.02, 1000, False)
    assert msg.report_json == text and msg.statement.startswith("Each client")


def test_privacy_report_as_fedlora_privacy_writes_it():
    # The layout of fedlora.privacy.report.build_privacy_report (abridged): a σ = 0 client has ε "inf".
    report = {
        "mode": "example", "privacy_unit": "one training example", "headline_accountant": "rdp",
        "worst_client": {"client": "1", "epsilon": "inf", "delta": 1e-5, "accountant": "rdp", "rounds_participated": 2},
        "clients": [
            {"client": "0", "num_examples": 900, "q": 0.01, "sigma": 1.1, "rounds_participated": 2, "total_steps": 40,
             "delta": 1e-5, "epsilon": 0.9, "accountant": "rdp", "epsilon_rdp": 0.9, "epsilon_prv": 0.8},
            {"client": "1", "num_examples": 800, "q": 0.02, "sigma": 0.0, "rounds_participated": 2, "total_steps": 40,
             "delta": 1e-5, "epsilon": "inf", "accountant": "rdp", "epsilon_rdp": "inf", "epsilon_prv": None},
        ],
        "client_level": None, "statement": "Client 1 trained without noise (σ = 0): there is no guarantee.",
    }
    msg = privacy_report_to_proto(report)
    assert (msg.unit, msg.accountant, msg.worst_client, msg.worst_epsilon) == ("example", "rdp", "1", float("inf"))
    assert [(c.client, c.epsilon, c.sample_rate, c.steps, c.rounds) for c in msg.clients] == [
        ("0", 0.9, 0.01, 40, 2), ("1", float("inf"), 0.02, 40, 2)]
    assert msg.clients[0].epsilon_prv == 0.8 and not msg.clients[1].HasField("epsilon_prv")
    assert json.loads(msg.report_json) == report


def test_client_level_privacy_report():
    msg = privacy_report_to_proto({"mode": "client", "client_level": {"epsilon": 2.5, "delta": 1e-3}, "statement": "s"})
    assert (msg.unit, msg.worst_epsilon, msg.delta, len(msg.clients)) == ("client", 2.5, 1e-3, 0)
