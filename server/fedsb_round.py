"""Fed-SB's federated initialisation as two Flower query rounds (the math: fedlora/aggregation/fedsb_init.py).

Pass 1: every node gets the sketch seed and width and returns Y_i = G_i·Ω per layer. Pass 2: the
server sends Q = orth(Σ p_i·Y_i) and every node returns Z_i = Qᵀ·G_i; the server's SVD of
Σ p_i·Z_i gives the frame (B, A) and R₀. No client ever sends its d_out×d_in gradient.
"""

from __future__ import annotations

import logging

import torch
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedlora.adapters.state import LoraFactors
from fedlora.aggregation import GlobalState, fedsb
from fedlora.aggregation.fedsb_init import server_factors, server_range_basis
from fedlora.protocol.messages import (
    BASIS,
    CONFIG,
    METRICS,
    NUM_EXAMPLES,
    SB_PROJECT,
    SB_SKETCH,
    SKETCH,
    SBInitQuery,
    content_bytes,
    from_array_record,
    to_array_record,
)
from fedlora_server.transport import stream_replies
from fedlora_server.strategy import LoraStrategy, NodeInfo

log = logging.getLogger("fedlora")


def _ask(grid: Grid, nodes: list[NodeInfo], config: SBInitQuery, arrays: dict | None, timeout) -> tuple[dict, dict, int, int]:
    """Send one init query to every node; returns ({node: arrays}, {node: weight}, bytes down, up)."""
    messages, down = [], 0
    for node in nodes:
        content = RecordDict({CONFIG: config.to_record()})
        if arrays is not None:
            content[BASIS] = to_array_record(arrays)
        down += content_bytes(content)
        messages.append(Message(content=content, dst_node_id=node.node_id, message_type=MessageType.QUERY))
    pieces, weights, up = {}, {}, 0
    for reply in stream_replies(grid, messages, timeout):
        if reply.has_error():
            log.warning("Fed-SB init: node %s failed: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        up += content_bytes(reply.content)
        pieces[reply.metadata.src_node_id] = {k: torch.from_numpy(v) for k, v in from_array_record(reply.content[SKETCH]).items()}
        weights[reply.metadata.src_node_id] = float(reply.content[METRICS][NUM_EXAMPLES])
    return pieces, weights, down, up


def federated_sb_init(grid: Grid, strategy: LoraStrategy, state: GlobalState, nodes: list[NodeInfo],
                      min_rank: int) -> tuple[GlobalState, dict[str, int]]:
    """The Fed-SB round-0 state from the clients' gradients; returns it and the bytes it cost."""
    cfg = strategy.cfg
    rank = max(n.rank for n in nodes)
    width = rank + cfg.strategy.fedsb_oversample
    seed = cfg.adapter.init_seed
    timeout = cfg.strategy.round_timeout
    def query(kind: str) -> SBInitQuery:
        return SBInitQuery(kind, cfg.strategy.fedsb_init_examples, seed, width)

    ys, w1, down1, up1 = _ask(grid, nodes, query(SB_SKETCH), None, timeout)
    if len(ys) < cfg.strategy.min_clients:
        raise RuntimeError(f"Fed-SB init: only {len(ys)} nodes answered the sketch pass")
    order = sorted(ys)
    layers = sorted(next(iter(ys.values())))
    basis = {n: server_range_basis([ys[i][n] for i in order], [w1[i] for i in order]) for n in layers}
    zs, w2, down2, up2 = _ask(grid, [n for n in nodes if n.node_id in ys], query(SB_PROJECT),
                              {n: q.numpy() for n, q in basis.items()}, timeout)
    order = sorted(zs)
    frame, core = {}, {}
    scale = strategy.scale(rank)
    for n in layers:
        init = server_factors([zs[i][n] for i in order], [w2[i] for i in order],
                              basis[n], rank, lr=cfg.train.lr, scale=scale)
        frame[n], core[n] = (init.B, init.A), init.R0
    run_extras = {k: v for k, v in state.extras.items() if k not in ("sb_frame", "sb_core", "rank_scales")}
    # Start from R = 0 on the new frame and apply R₀ as one update, so that (with mixed ranks) the
    # part of R₀ a low-rank client cannot hold is folded exactly into the base, as every round does.
    zero = fedsb.initial_state(frame, scale, **run_extras)
    r0 = {n: LoraFactors(core[n], torch.eye(rank), scale) for n in layers}
    new_state = fedsb.METHOD.aggregate(zero, [r0], [1.0])
    cost = {"init_bytes_down": down1 + down2, "init_bytes_up": up1 + up2, "init_clients": len(order)}
    return new_state, cost
