"""The per-process worker cache (fedlora.worker_cache) is invisible: a client built from the cached base
gives the same numbers as one built from a fresh load, round after round, and nothing a client does
to its model reaches the cache.

The ClientApp is called directly, in this process, with the messages the server would send
(the Simulation Engine's workers call it exactly so: ``app(message, context)`` on a long-lived
process), so two consecutive rounds run in one process with and without the cache.
"""

from __future__ import annotations

import secrets
import time

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, Metadata, MessageType, RecordDict

from fedlora.adapters import adapter_modules, arrays_to_state, get_adapter_state
from fedlora.adapters.base_terms import apply_base_terms
from fedlora.adapters.state import LoraFactors
from fedlora.config import config_from_dict
from fedlora.protocol.messages import METRICS, UPDATE, from_array_record, train_content
from fedlora.data.splits import client_examples, client_split
from fedlora.model.build import build_model
from fedlora.worker_cache import BASES, EXAMPLES, LRUCache, clear_worker_cache
from fedlora_client.app import make_client_app
from fedlora_server.strategy import make_strategy

NUM_CLIENTS = 2


def tiny_cfg(run_dir, strategy="fedex", dp="none", quant="none", **extra):
    data = {"model": {"name_or_path": "tiny", "dtype": "float32", "device": "cpu"},
            "dataset": {"max_length": 64}, "train": {"local_steps": 2, "batch_size": 4, "lr": 0.01},
            "eval": {"max_examples": 8}, "strategy": {"name": strategy}, "quant": {"format": quant},
            "adapter": {"rank": 4}, "num_clients": NUM_CLIENTS, "num_rounds": 2, "run_dir": str(run_dir), **extra}
    if dp == "example":
        data["dp"] = {"mode": "example", "noise_multiplier": 1.0, "max_grad_norm": 1.0}
    return config_from_dict(data)


def incoming(content: RecordDict, node_id: int, message_type: str, n: int) -> Message:
    """A message as a client receives it from the SuperLink."""
    meta = Metadata(run_id=1, message_id=f"msg-{n}", src_node_id=0, dst_node_id=node_id, reply_to_message_id="",
                    group_id="", created_at=time.time(), ttl=3600.0, message_type=message_type)
    return Message(content, metadata=meta)


def two_rounds(cfg, *, fresh: bool) -> dict:
    """Two rounds of train + evaluate on every client and the server's aggregation in between;
    ``fresh`` empties the process cache before every client call (a fresh load each time)."""
    strategy = make_strategy(cfg)
    server_model, _ = build_model(cfg, kind="lora")
    state = strategy.initial_state(get_adapter_state(server_model), min_rank=cfg.adapter.rank)
    app = make_client_app(cfg)
    contexts = [Context(run_id=1, node_id=pid + 1, node_config={"partition-id": pid, "num-partitions": NUM_CLIENTS},
                        state=RecordDict(), run_config={}) for pid in range(NUM_CLIENTS)]
    out = {"updates": [], "train_loss": [], "eval_loss": [], "base_terms": []}
    n = 0
    for rnd in (1, 2):
        config = strategy.round_config(rnd, cfg.adapter.rank)
        out["base_terms"].append(sum(len(t) for t in state.base_terms.values()))
        acc = strategy.accumulator(state)
        for pid, context in enumerate(contexts):
            start = strategy.start_for(state, cfg.adapter.rank)
            if fresh:
                clear_worker_cache()
            reply = app(incoming(train_content(start, state.base_terms, config), pid + 1,
                                 MessageType.TRAIN, n := n + 1), context)
            assert not reply.has_error(), reply.error.reason
            arrays = from_array_record(reply.content[UPDATE])
            out["updates"].append({k: np.array(v) for k, v in arrays.items()})
            out["train_loss"].append(float(reply.content[METRICS]["train_loss"]))
            acc.add(arrays_to_state(arrays, like=start), float(reply.content[METRICS]["num-examples"]))
        state = acc.finish()
        for pid, context in enumerate(contexts):
            if fresh:
                clear_worker_cache()
            start = strategy.start_for(state, cfg.adapter.rank)
            reply = app(incoming(train_content(start, state.base_terms, config), pid + 1,
                                 MessageType.EVALUATE, n := n + 1), context)
            out["eval_loss"].append(float(reply.content[METRICS]["eval_loss"]))
    return out


@pytest.mark.parametrize("strategy,dp,quant", [
    ("fedex", "none", "none"),      # residual base terms added to the dense base weights in place
    ("fedex", "example", "none"),   # DP-SGD: per-adapter hooks, accountant state in the node's Context
    ("flora", "none", "int8"),      # merged stacks go into the quantized layers' side terms
])
def test_cached_rounds_equal_fresh_loads(tmp_path, monkeypatch, strategy, dp, quant):
    # Prepare: DP noise and sampling are seeded from the OS; fix the seed so both passes draw alike.
    monkeypatch.setattr(secrets, "randbits", lambda bits: 1234567)
    cached_cfg = tiny_cfg(tmp_path / "cached", strategy, dp, quant)
    fresh_cfg = tiny_cfg(tmp_path / "fresh", strategy, dp, quant)

    # Execute: the same two rounds with the cache, then with a fresh load for every call.
    clear_worker_cache()
    cached = two_rounds(cached_cfg, fresh=False)
    hits = BASES.info()["hits"]
    fresh = two_rounds(fresh_cfg, fresh=True)

    # Assert: the cache was really used (the first build in a process keeps nothing, the second
    # fills the cache, the other six are copies of it), round 2 really carried base terms, and
    # every number is equal.
    assert hits == 4 * NUM_CLIENTS - 2
    assert cached["base_terms"][0] == 0 and cached["base_terms"][1] > 0
    assert cached["train_loss"] == fresh["train_loss"]
    assert cached["eval_loss"] == fresh["eval_loss"]
    for a, b in zip(cached["updates"], fresh["updates"], strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert cached["train_loss"][:NUM_CLIENTS] != cached["train_loss"][NUM_CLIENTS:]  # round 2 trained on


def test_nothing_a_client_does_reaches_the_cached_base(tmp_path):
    # Prepare: one model from the cache, and a pristine reference.
    cfg = tiny_cfg(tmp_path)
    clear_worker_cache()
    build_model(cfg, reuse=True)  # the first build in a process is a plain one: nothing cached
    assert BASES.info()["entries"] == 0
    used, _ = build_model(cfg, reuse=True)
    reference, _ = build_model(cfg)

    # Execute: everything a client may do to its copy.
    name, layer = next(iter(adapter_modules(used).items()))
    w = layer.base.weight
    term = LoraFactors(torch.ones(2, w.shape[1]), torch.ones(w.shape[0], 2), 1.0)
    apply_base_terms(used, {name: [term]})  # in place on an adapted layer's weight
    layer.merge()
    used.get_input_embeddings().weight.requires_grad_(True)
    used.get_input_embeddings().register_forward_hook(lambda *a: None)
    used.to(torch.float64)  # swaps .data of every parameter of the copy
    again, _ = build_model(cfg, reuse=True)

    # Assert: the next copy equals a fresh build, and shares only the untouched frozen storage.
    assert BASES.info() == {"entries": 1, "weight": 1.0, "hits": 1, "misses": 1}
    fresh_state, again_state = reference.state_dict(), again.state_dict()
    assert fresh_state.keys() == again_state.keys()
    for key, t in fresh_state.items():
        assert again_state[key].dtype == torch.float32 and torch.equal(again_state[key], t), key
    assert not any(p.requires_grad for n, p in again.named_parameters() if "lora_" not in n)
    assert not again.get_input_embeddings()._forward_hooks
    third, _ = build_model(cfg, reuse=True)
    weights = [next(iter(adapter_modules(m).values())).base.weight for m in (again, third)]
    assert weights[0].data_ptr() != weights[1].data_ptr()  # adapted layers: each copy owns its own
    embeddings = [m.get_input_embeddings().weight for m in (again, third)]
    assert embeddings[0].data_ptr() == embeddings[1].data_ptr()  # other frozen tensors: shared storage
    assert embeddings[0] is not embeddings[1]  # … through distinct Parameter objects


def test_client_data_is_prepared_once_and_bounded(tmp_path, tokenizer):
    cfg = tiny_cfg(tmp_path, "fedavg", num_clients=1000)
    clear_worker_cache()
    first = client_examples(cfg, tokenizer, 7, 1000)
    again = client_examples(cfg, tokenizer, 7, 1000)
    assert first == again and first is not again and EXAMPLES.info()["hits"] == 1
    # 1,119 training rows over 1,000 clients: one or two each; 200 held-out rows: client i scores row i mod 200
    assert [len(client_split(cfg, i, 1000)) for i in (0, 999)] == [2, 1]
    assert client_split(cfg, 7, 1000, split="eval")["question"] == client_split(cfg, 207, 1000, split="eval")["question"]

    lru = LRUCache(max_entries=3, max_weight=10)
    for i in range(5):
        lru.get(f"k{i}", lambda i=i: i, weight=lambda _: 4)
    assert lru.info() == {"entries": 2, "weight": 8.0, "hits": 0, "misses": 5}
    assert lru.get("k4", lambda: -1) == 4 and lru.get("k0", lambda: -1) == -1
