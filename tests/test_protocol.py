"""The typed records of the wire protocol: what the server writes is what the client reads, and
a record from another fedlora version is refused naming what it lacks."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord

from fedlora.protocol.messages import (
    SB_PROJECT,
    SB_SKETCH,
    ProtocolError,
    RoundConfig,
    SBInitQuery,
)


def test_round_config_survives_a_config_record():
    sent = RoundConfig(round=3, num_rounds=10, strategy="ffa", rank=8, adapter_kind="frozen_a", parts=("B",))
    record = sent.to_record()
    assert dict(record) == {"round": 3, "num_rounds": 10, "strategy": "ffa", "rank": 8, "adapter_kind": "frozen_a",
                            "parts": "B"}
    assert RoundConfig.from_record(record) == sent
    two = RoundConfig(1, 2, "fedavg", 4, "lora", ("A", "B"))
    assert RoundConfig.from_record(two.to_record()).parts == ("A", "B")


def test_a_record_from_another_version_is_refused_naming_the_missing_keys():
    old = ConfigRecord({"round": 1, "num_rounds": 2, "strategy": "fedavg", "rank": 4, "adapter_kind": "lora",
                        "upload": "A,B"})
    with pytest.raises(ProtocolError, match=r"RoundConfig record lacks \['parts'\]"):
        RoundConfig.from_record(old)


def test_sb_init_query_round_trips_and_refuses_an_unknown_pass():
    for kind in (SB_SKETCH, SB_PROJECT):
        q = SBInitQuery(kind, n_examples=16, seed=7, width=12)
        assert SBInitQuery.from_record(q.to_record()) == q
    with pytest.raises(ProtocolError, match="unknown Fed-SB init query 'sb_power'"):
        SBInitQuery.from_record(ConfigRecord({"query": "sb_power", "n_examples": 1, "seed": 0, "width": 2}))
