"""The server's round loop: sample, send, aggregate, evaluate, record.

Written against Flower's Grid/Message API directly (rather than ``Strategy.start``) so every
round's real payload bytes, the aggregation error and the rejected replies are measured here and
land in ``metrics.jsonl``.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from fedlora.adapters import arrays_to_state, get_adapter_state, set_adapter_state
from fedlora.aggregation import GlobalState, aggregation_error, ideal_update, round_update
from fedlora.base_terms import apply_base_terms
from fedlora.config import FedloraConfig, config_to_dict
from fedlora.data import format_example
from fedlora.evaluation import evaluate_loss, gsm8k_accuracy
from fedlora.messages import METRICS, UPDATE, content_bytes, from_array_record, train_content
from fedlora.partition import format_partition_stats, partition_dataset, partition_stats, save_partition_stats
from fedlora.peft_export import export_state, save_peft_adapter
from fedlora.reporting import RunWriter
from fedlora.workspace import build_model, load_splits, tokenize
from fedlora_server.strategy import make_strategy

log = logging.getLogger("fedlora")


@dataclass
class RoundReplies:
    updates: list = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    bytes_up: int = 0


def wait_for_nodes(grid: Grid, needed: int, timeout: float = 300.0) -> list[int]:
    """Connected node ids once at least ``needed`` are there."""
    deadline = time.time() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= needed:
            return nodes
        if time.time() > deadline:
            raise RuntimeError(f"only {len(nodes)} client nodes connected after {timeout:.0f} s; {needed} needed")
        time.sleep(1.0)


def collect(replies, strategy, reference) -> RoundReplies:
    """Sort train replies into accepted updates and logged rejections."""
    out = RoundReplies()
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            out.rejected.append(f"node {node}: error {reply.error.reason}")
            continue
        out.bytes_up += content_bytes(reply.content)
        metrics = reply.content[METRICS]
        if metrics.get("declined"):
            out.rejected.append(f"node {node}: declined")
            continue
        try:
            update = arrays_to_state(from_array_record(reply.content[UPDATE]))
        except (KeyError, ValueError) as err:
            out.rejected.append(f"node {node}: malformed update ({err})")
            continue
        reason = strategy.check_update(update, reference)
        if reason:
            out.rejected.append(f"node {node}: {reason}")
            continue
        out.updates.append(update)
        out.weights.append(float(metrics["num-examples"]))
        out.train_losses.append(float(metrics["train_loss"]))
    for why in out.rejected:
        log.warning("rejected reply: %s", why)
    return out


def run_server(grid: Grid, cfg: FedloraConfig, run_dir: str | Path) -> dict:
    """Run ``cfg.num_rounds`` rounds; returns the summary written to ``summary.json``."""
    strategy = make_strategy(cfg)  # bad strategy / rank mix fails before any loading
    writer = RunWriter(run_dir)
    writer.write_config(config_to_dict(cfg))
    print(f"fedlora: run directory {writer.dir}", flush=True)

    # Everything that can fail on bad input happens before round 1.
    model, tokenizer = build_model(cfg)
    train_ds, held_out = load_splits(cfg)
    stats = partition_stats(partition_dataset(train_ds, cfg.dataset, cfg.num_clients), cfg.dataset)
    save_partition_stats(stats, writer.dir)
    print(format_partition_stats(stats), flush=True)
    eval_examples = tokenize(held_out, tokenizer, cfg, limit=cfg.eval.max_examples)
    pad_id = tokenizer.pad_token_id
    device = next(model.parameters()).device
    print(f"fedlora: model on {device}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
          f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f} M trainable", flush=True)
    if not strategy.exact:
        print(f"fedlora: strategy {cfg.strategy.name} is not exact; agg_error reports its real error", flush=True)

    def server_eval() -> float:
        return evaluate_loss(model, eval_examples, batch_size=cfg.eval.batch_size, pad_id=pad_id, progress=True).loss

    state = GlobalState(adapter=get_adapter_state(model))
    rng = random.Random(cfg.seed)
    writer.log_round({"round": 0, "strategy": cfg.strategy.name, "clients": 0, "train_loss": None,
                      "eval_loss": server_eval(), "agg_error": None, "bytes_up": 0, "bytes_down": 0, "seconds": 0.0})

    for rnd in range(1, cfg.num_rounds + 1):
        started = time.time()
        nodes = strategy.sample(wait_for_nodes(grid, cfg.strategy.min_clients), rng)
        content = train_content(state.adapter, state.base_terms, strategy.train_config(rnd, cfg.num_rounds))
        bytes_down = content_bytes(content) * len(nodes)
        print(f"fedlora: round {rnd}/{cfg.num_rounds}: training on {len(nodes)} clients …", flush=True)
        messages = [Message(content=content.copy(), dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]
        got = collect(grid.send_and_receive(messages, timeout=cfg.strategy.round_timeout), strategy, state.adapter)
        row = {"round": rnd, "strategy": cfg.strategy.name, "clients": len(got.updates),
               "rejected": len(got.rejected), "bytes_down": bytes_down, "bytes_up": got.bytes_up}
        if len(got.updates) < cfg.strategy.min_clients:
            log.warning("round %d: %d usable replies < min_clients=%d; keeping the previous global adapter",
                        rnd, len(got.updates), cfg.strategy.min_clients)
            row.update(train_loss=None, eval_loss=None, agg_error=None)
        else:
            new_state = strategy.aggregate(state, got.updates, got.weights)
            error = aggregation_error(round_update(state, new_state), ideal_update(got.updates, got.weights))
            apply_base_terms(model, {n: t[len(state.base_terms.get(n, [])):] for n, t in new_state.base_terms.items()})
            set_adapter_state(model, new_state.adapter)
            state = new_state
            total = sum(got.weights)
            row.update(train_loss=sum(w * l for w, l in zip(got.weights, got.train_losses)) / total,
                       eval_loss=server_eval(), agg_error=error)
            if cfg.eval.client_eval:
                row.update(client_eval(grid, nodes, state, strategy, rnd, cfg))
        row["seconds"] = round(time.time() - started, 2)
        writer.log_round(row)

    if not any(r.get("eval_loss") is not None for r in writer.rows[1:]):
        raise RuntimeError("no round got enough usable client replies; see the rejected replies logged above")
    extra = {"strategy": cfg.strategy.name, "model": cfg.model.name_or_path, "dataset": cfg.dataset.name,
             "device": str(device)}
    if cfg.eval.gsm8k_problems > 0:
        rows = held_out.select(range(min(cfg.eval.gsm8k_problems, len(held_out))))
        problems = [format_example(r, cfg.dataset) for r in rows]
        extra["gsm8k"] = gsm8k_accuracy(model, tokenizer, problems, max_new_tokens=cfg.eval.max_new_tokens, progress=True)
        print(f"fedlora: GSM8K exact match {extra['gsm8k']['correct']}/{extra['gsm8k']['total']}", flush=True)
    adapter_dir = save_peft_adapter(export_state(state, cfg.adapter.alpha, cfg.adapter.rslora), cfg.adapter, writer.dir / "adapter",
                                    base_model=cfg.model.name_or_path)
    writer.plot()
    summary_path = writer.write_summary(extra | {"adapter_dir": str(adapter_dir)})
    print(f"fedlora: done; results in {writer.dir} ({summary_path.name}, metrics.jsonl, adapter/, eval_loss.png)", flush=True)
    return {"run_dir": str(writer.dir), "rows": writer.rows}


def client_eval(grid: Grid, nodes: list[int], state: GlobalState, strategy, rnd: int, cfg: FedloraConfig) -> dict:
    """Clients' own held-out loss of the new global adapter, weighted by their token counts."""
    content = train_content(state.adapter, state.base_terms, strategy.train_config(rnd, cfg.num_rounds))
    messages = [Message(content=content.copy(), dst_node_id=n, message_type=MessageType.EVALUATE) for n in nodes]
    losses, weights, up = [], [], 0
    for reply in grid.send_and_receive(messages, timeout=cfg.strategy.round_timeout):
        if reply.has_error():
            log.warning("evaluate reply from node %s: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        up += content_bytes(reply.content)
        m = reply.content[METRICS]
        losses.append(float(m["eval_loss"]))
        weights.append(float(m["eval_tokens"]))
    if not losses:
        return {}
    return {"client_eval_loss": sum(l * w for l, w in zip(losses, weights)) / sum(weights),
            "eval_bytes_down": content_bytes(content) * len(nodes), "eval_bytes_up": up}
