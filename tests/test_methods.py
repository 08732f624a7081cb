"""Every aggregation method's declaration (``METHOD``) against what the method really does.

Conformance over the registry: every module declares exactly one valid :class:`Method`; the
declared facts hold (a ``weighted_sum`` method's aggregate equals the aggregate of the weighted
mean update, the parts that travel are what a reply must carry, client-level DP follows
``client_dp``); a wrong declaration fails when it is made. Then the server's own reply path
(``Round.take``: reply check, parse, aggregate, ΔW* reference) for every streaming method, with
the tensors the server still holds counted after 4 and after 32 replies.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import pkgutil
import warnings

import pytest
import torch

import fedlora.aggregation as aggregation
from fedlora.adapters.state import LoraFactors
from fedlora.aggregation import METHODS, GlobalState, Method, resolve_method
from fedlora.aggregation.method import Buffered, ClientDP, Streaming
from fedlora.config import ConfigError, FedloraConfig, config_from_dict
from fedlora.memory import tensor_bytes
from fedlora.protocol.messages import content_bytes, reply_content
from fedlora.privacy import check_client_level_strategy
from fedlora.privacy.client_level import ClientLevelDPError
from fedlora_server.loop import Round, recorded_agg_error
from fedlora_server.strategy import make_strategy

SHAPES = {"q": (24, 16), "v": (16, 40)}  # layer → (d_out, d_in)
RANK, ALPHA = 4, 8.0


def _cfg(name: str, **more) -> FedloraConfig:
    return config_from_dict({"strategy": {"name": name}, "adapter": {"rank": RANK, "alpha": ALPHA}, **more})


def _start_state(name: str) -> GlobalState:
    """The round-0 state the server would build from a fresh rank-RANK adapter (B = 0)."""
    g = torch.Generator().manual_seed(1)
    adapter = {n: LoraFactors(torch.randn(RANK, d_in, generator=g), torch.zeros(d_out, RANK), ALPHA / RANK)
               for n, (d_out, d_in) in SHAPES.items()}
    return make_strategy(_cfg(name)).initial_state(adapter, min_rank=RANK)


def _client_update(name: str, start: dict, seed: int) -> dict:
    """What a client of ``name`` trains from ``start``: new B (and A unless frozen); a new core R."""
    g = torch.Generator().manual_seed(100 + seed)
    out = {}
    for n, f in start.items():
        if METHODS[name].adapter_kind == "sb":
            out[n] = LoraFactors(torch.randn(f.rank, f.rank, generator=g), torch.eye(f.rank), f.scale)
        elif METHODS[name].adapter_kind == "frozen_a":
            out[n] = LoraFactors(f.A, torch.randn(f.B.shape, generator=g), f.scale)
        else:
            out[n] = LoraFactors(torch.randn(f.A.shape, generator=g), torch.randn(f.B.shape, generator=g), f.scale)
    return out


# ---------------------------------------------------------------------------------------------
# The registry and the declarations


def test_every_aggregation_module_declares_one_method_and_the_registry_lists_them_all():
    modules = [m.name for m in pkgutil.iter_modules(aggregation.__path__)]
    declared = {}
    for mod_name in modules:
        module = importlib.import_module(f"fedlora.aggregation.{mod_name}")
        if hasattr(module, "METHOD"):
            declared[mod_name] = module.METHOD
        # the facts live in METHOD only: no loose per-method constants beside it
        assert not {"EXACT", "MIXED_RANKS", "PAYLOAD", "ADAPTER_KIND"} & set(vars(module)), mod_name
    assert declared == METHODS
    assert sorted(METHODS) == ["fedavg", "fedex", "fedsb", "ffa", "flora", "hetlora", "lorafair"]
    for name, method in METHODS.items():
        assert isinstance(method, Method) and method.name == name


@pytest.mark.parametrize("change, problem", [
    ({"parts": ("A", "C")}, "parts"),
    ({"parts": ("B",), "adapter_kind": "sb"}, "core R travels"),
    ({"adapter_kind": "frozen_a"}, "frozen A never travels"),
    ({"client_dp": ClientDP()}, "client_dp must either"),
    ({"client_dp": ClientDP(clipped=("A",), refused="no")}, "client_dp must either"),
    ({"aggregation": Buffered(lambda s, u, w: s, why=" ")}, "must say why"),
    ({"aggregation": object()}, "Streaming"),
    ({"paper": ""}, "paper"),
])
def test_a_wrong_declaration_fails_when_it_is_made(change, problem):
    good = dataclasses.asdict(METHODS["fedavg"]) | {"aggregation": METHODS["fedavg"].aggregation,
                                                    "client_dp": METHODS["fedavg"].client_dp}
    Method(**good)  # the real one is valid
    with pytest.raises(TypeError, match=problem):
        Method(**(good | change))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_declared_facts_hold(name):
    # Prepare
    method = METHODS[name]
    state = _start_state(name)
    strategy = make_strategy(_cfg(name))
    start = strategy.start_for(state, RANK)
    updates = [_client_update(name, start, s) for s in range(3)]
    weights = [3.0, 1.0, 2.0]
    # Execute
    after = method.aggregate(state, updates, weights)
    # Assert: shapes a rank-RANK client starts from; replies carry exactly the declared parts
    assert set(start) == set(SHAPES) and all(f.rank == RANK for f in start.values())
    keys = set(strategy.expected_reply(start))
    assert {k.rsplit(".", 1)[1] for k in keys} == {f"lora_{p}" for p in method.parts} | {"scale"}
    lifted = method.lift(state, updates[0])
    assert {n: (f.B.shape[0], f.A.shape[1]) for n, f in lifted.items()} == SHAPES
    # streaming and batch are one path: the same numbers whichever way replies arrive
    agg = method.begin(state)
    for u, w in zip(updates, weights):
        agg.add(u, w)
    streamed = agg.finish()
    for n in SHAPES:
        assert torch.allclose(streamed.adapter[n].delta(torch.float64), after.adapter[n].delta(torch.float64), atol=1e-6)
    # weighted_sum: the aggregate of the replies equals the aggregate of their weighted mean,
    # i.e. the server needs only Σ w_i·x_i (what secure aggregation reveals); the others need more
    p = [w / sum(weights) for w in weights]
    mean = {n: LoraFactors(sum(pi * u[n].A.double() for pi, u in zip(p, updates)).float(),
                           sum(pi * u[n].B.double() for pi, u in zip(p, updates)).float(), updates[0][n].scale)
            for n in SHAPES}
    of_mean = method.aggregate(state, [mean], [1.0])

    def total(s):  # the whole update the round makes: adapter plus new base terms
        return {n: s.adapter[n].delta(torch.float64) + sum((t.delta(torch.float64) for t in s.base_terms.get(n, [])),
                                                           torch.zeros(SHAPES[n], dtype=torch.float64)) for n in SHAPES}

    same = all(torch.allclose(total(after)[n], total(of_mean)[n], atol=1e-5) for n in SHAPES)
    assert same == method.weighted_sum
    # client-level DP follows client_dp
    if method.client_dp.clipped:
        assert check_client_level_strategy(name) == method.client_dp.clipped
    else:
        with pytest.raises(ClientLevelDPError, match="cannot run"):
            check_client_level_strategy(name)


def test_the_config_is_checked_against_the_declaration():
    assert resolve_method(_cfg("fedex", client_ranks=[4, 8])) is METHODS["fedex"]
    with pytest.raises(ConfigError, match="strategy=fedavg cannot aggregate clients of different ranks"):
        resolve_method(_cfg("fedavg", client_ranks=[4, 8]))
    with pytest.raises(ConfigError, match="strategy='fedmystery' is unknown"):
        resolve_method(_cfg("fedmystery"))
    with pytest.raises(ConfigError, match="strategy=fedsb trains adapter.kind=sb"):
        resolve_method(_cfg("fedsb", adapter={"rank": RANK, "kind": "frozen_a"}))


# ---------------------------------------------------------------------------------------------
# The server's reply path streams for every streaming method


def _live_tensor_bytes() -> int:
    gc.collect()
    storages = {}
    with warnings.catch_warnings():  # isinstance() on torch's deprecated module attributes warns
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in tensors:
        s = obj.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def _server_round(name: str, n: int) -> tuple[Round, int, int]:
    """Feed ``n`` real train replies through ``Round.take``; (round, bytes it holds, live tensor
    bytes in the process after the replies are gone)."""
    strategy = make_strategy(_cfg(name))
    state = _start_state(name)
    start = strategy.start_for(state, RANK)
    rnd = Round(strategy, state)
    before = _live_tensor_bytes()
    for i in range(n):
        content = reply_content(_client_update(name, start, i), {"num-examples": 10 + i, "train_loss": 1.0},
                                strategy.parts)
        assert rnd.take(content, start, content_bytes(content), f"client {i}"), rnd.rejected
        del content
    return rnd, tensor_bytes(rnd), _live_tensor_bytes() - before


@pytest.mark.parametrize("name", sorted(n for n, m in METHODS.items() if m.streams))
def test_server_memory_does_not_grow_with_the_number_of_replies(name):
    # Execute
    few, held_few, live_few = _server_round(name, 4)
    many, held_many, live_many = _server_round(name, 32)
    # Assert: the round holds the same running sums for 4 and 32 replies, and nothing else in the
    # process kept a reply; both rounds still aggregate
    assert many.accepted == 32 and few.accepted == 4
    assert held_many == held_few, (held_few, held_many)
    assert live_many <= live_few + 4096, (live_few, live_many)
    assert many.aggregate.finish().adapter.keys() == set(SHAPES)


def test_a_buffered_method_holds_every_reply_and_says_why():
    # the contrast that makes the test above meaningful: FedEx-LoRA's residual needs every update
    fedex = METHODS["fedex"]
    assert isinstance(fedex.aggregation, Buffered) and "every client" in fedex.aggregation.why
    _, held_few, _ = _server_round("fedex", 4)
    _, held_many, _ = _server_round("fedex", 32)
    per_reply = sum(4 * RANK * (d_out + d_in) for d_out, d_in in SHAPES.values())  # fp32 A and B
    assert held_many - held_few == (32 - 4) * per_reply
    assert all(isinstance(m.aggregation, Streaming) for n, m in METHODS.items() if n not in ("fedex", "flora"))


@pytest.mark.parametrize("name", sorted(n for n, m in METHODS.items() if m.streams))
def test_the_order_replies_arrive_in_changes_no_recorded_number(name):
    # Prepare: 6 replies with unequal weights and losses, fed in 3 arrival orders
    strategy = make_strategy(_cfg(name))
    state = _start_state(name)
    start = strategy.start_for(state, RANK)
    replies = [reply_content(_client_update(name, start, i), {"num-examples": 10 + 7 * i, "train_loss": 1.0 + i / 3,
                                                              "train_tokens": 50 + i}, strategy.parts)
               for i in range(6)]
    outcomes = []
    for order in ([0, 1, 2, 3, 4, 5], [5, 3, 1, 0, 2, 4], [2, 5, 4, 1, 3, 0]):
        rnd = Round(strategy, state)
        for i in order:
            assert rnd.take(replies[i], start, content_bytes(replies[i]), f"client {i}", order=(i, 100 + i))
        new = rnd.aggregate.finish()
        outcomes.append((new.adapter, rnd.train_loss(), recorded_agg_error(state, new, rnd), rnd.train_seconds))
    # Assert: the same adapter bit for bit, and the same train loss and recorded agg_error
    first = outcomes[0]
    for adapter, loss, error, seconds in outcomes[1:]:
        assert all(torch.equal(adapter[n].A, first[0][n].A) and torch.equal(adapter[n].B, first[0][n].B) for n in SHAPES)
        assert (loss, error, seconds) == first[1:]
    weights = [10 + 7 * i for i in range(6)]
    assert first[1] == sum(w * (1.0 + i / 3) for i, w in enumerate(weights)) / sum(weights)


def test_a_reply_that_used_no_examples_keeps_its_weight_and_gives_no_train_loss():
    # Prepare: under DP-SGD's Poisson sampling a client may sample nothing in a round; its reply
    # carries train_tokens = 0 and no train_loss
    strategy = make_strategy(_cfg("fedavg"))
    state = _start_state("fedavg")
    start = strategy.start_for(state, RANK)

    def reply(i, **metrics):
        return reply_content(_client_update("fedavg", start, i), {"num-examples": 30, **metrics}, strategy.parts)

    empty = reply(0, train_tokens=0, train_examples=0)
    used = reply(1, train_tokens=40, train_examples=3, train_loss=2.5)
    lying = reply(2, train_tokens=40, train_examples=3)  # tokens used but no loss: malformed
    # Execute
    rnd = Round(strategy, state)
    took = [rnd.take(c, start, content_bytes(c), f"client {i}", order=(i, i)) for i, c in enumerate((empty, used, lying))]
    alone = Round(strategy, state)
    alone.take(empty, start, content_bytes(empty), "client 0")
    # Assert: the empty reply is aggregated with its weight (its training-set size: what the
    # sampling rate q = batch/N was set from), the train loss is the one client's that used data,
    # and a round where no client used data has none
    assert took == [True, True, False]
    assert "malformed metrics: train_loss=None (must be a finite number when train_tokens > 0)" in rnd.rejected[0]
    assert [r.weight for r in rnd.accepted_replies] == [30.0, 30.0] and rnd.train_examples == 3
    assert rnd.train_loss() == 2.5 and alone.train_loss() is None
    mean = rnd.aggregate.finish().adapter
    for n in SHAPES:
        a0, a1 = _client_update("fedavg", start, 0)[n], _client_update("fedavg", start, 1)[n]
        torch.testing.assert_close(mean[n].A, (a0.A + a1.A) / 2, rtol=0, atol=1e-6)
