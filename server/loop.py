"""The server's round loop: discover nodes, sample, send, aggregate as replies arrive, evaluate,
record.

Written against Flower's Grid/Message API directly (rather than ``Strategy.start``) so every
round's real payload bytes, the aggregation error and the rejected replies are measured here and
land in ``metrics.jsonl``, and so replies are folded into the aggregate one by one as they arrive
(no list of every client's update for the streaming methods).
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedlora.adapters import get_adapter_state, set_adapter_state
from fedlora.adapters.base_terms import apply_base_terms
from fedlora.adapters.state import AdapterState
from fedlora.aggregation import GlobalState, RoundAggregate, aggregation_error, check_ranks, round_update
from fedlora.config import FedloraConfig, config_to_dict
from fedlora.data.partition import format_partition_stats, save_partition_stats
from fedlora.data.records import format_example
from fedlora.data.splits import tokenize
from fedlora.model.build import build_model
from fedlora.model.peft_export import export_state, peft_fan_in_fan_out, save_peft_adapter
from fedlora.model.targets import save_target_report
from fedlora.node_check import admit_nodes, expect_nodes
from fedlora.plan import RunPlan, plan_run
from fedlora.privacy import ClientLevelDP, append_entry, run_entry, worst_epsilon, write_privacy_report
from fedlora.protocol.messages import (
    CONFIG,
    EVAL_LOSS,
    EVAL_TOKENS,
    METRICS,
    NODE_INFO,
    NUM_EXAMPLES,
    NUM_PARTITIONS,
    OWN_DATA,
    PARTITION_ID,
    PRIVACY,
    PRIVACY_ENTRY,
    QUERY,
    RANK,
    TRAIN_EXAMPLES,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    content_bytes,
    train_content,
)
from fedlora.protocol.proto_io import write_global_adapter
from fedlora.rundir.checkpoint import (
    Checkpoint,
    CheckpointError,
    capture_rng,
    ledger_entries_since,
    ledger_position,
    restore_rng,
    save_checkpoint,
)
from fedlora.rundir.files import ADAPTER_DIR, LOSS_PLOT_FILE, METRICS_FILE, REPORT_FILE
from fedlora.rundir.writer import RunWriter, manifest, write_report
from fedlora.training.evaluation import evaluate_loss, gsm8k_accuracy
from fedlora_server.fedsb_round import federated_sb_init
from fedlora_server.strategy import IdealAccumulator, LoraStrategy, NodeInfo, short_error
from fedlora_server.transport import stream_replies

log = logging.getLogger("fedlora")


DISCOVERY_WINDOW = 16  # queries in flight; the simulation engine's delivery pass costs nodes × stored messages


def discover(grid: Grid, strategy: LoraStrategy, needed: int, known: list[NodeInfo] | None = None,
             timeout: float = 300.0, *, partition_stats: dict | None = None,
             warnings: list[str] | None = None) -> list[NodeInfo]:
    """The connected nodes, waiting for at least ``needed`` (before round 1 also until their number
    settles, :func:`_settled_node_ids`); nodes not ``known`` yet are asked for
    their partition, rank and data size and checked together with the known ones
    (:func:`fedlora.node_check.admit_nodes`; ``partition_stats``, the run's partitioning, adds the
    data-size check). Nodes that left are dropped, nodes that joined and pass are added.

    Without ``known`` (before round 1) inconsistent node configs raise ``NodeCheckError`` naming
    the nodes, partitions and fixes; later a failing newcomer is left out. Warnings (partitions no
    node holds, nodes left out, nodes that failed to answer) are logged and appended to ``warnings``."""
    deadline = time.time() + timeout
    while len(node_ids := list(grid.get_node_ids())) < needed:
        if time.time() > deadline:
            raise RuntimeError(f"only {len(node_ids)} client nodes connected after {timeout:.0f} s; {needed} needed")
        time.sleep(1.0)
    if known is None:
        node_ids = _settled_node_ids(grid, node_ids, expected=strategy.cfg.num_clients, deadline=deadline)  # one node per partition
    known_ids = {n.node_id: n for n in known or []}
    nodes = [known_ids[i] for i in node_ids if i in known_ids]
    node_ids = [i for i in node_ids if i not in known_ids]
    if not node_ids:
        return nodes
    query = [Message(content=RecordDict({CONFIG: ConfigRecord({QUERY: NODE_INFO})}), dst_node_id=n,
                     message_type=MessageType.QUERY) for n in node_ids]
    new, found = [], []
    for reply in stream_replies(grid, query, timeout, window=DISCOVERY_WINDOW):
        if reply.has_error():
            found.append(f"node {reply.metadata.src_node_id} failed discovery: {short_error(reply.error.reason)}")
            continue
        m = reply.content[METRICS]
        new.append(NodeInfo(reply.metadata.src_node_id, int(m[PARTITION_ID]), int(m[RANK]), int(m[NUM_EXAMPLES]),
                            int(m[NUM_PARTITIONS]) if NUM_PARTITIONS in m else None,
                            bool(m[OWN_DATA]) if OWN_DATA in m else None))
    nodes, notes = admit_nodes(new, expect_nodes(strategy.cfg, partition_stats), None if known is None else nodes)
    for note in found + notes:
        log.warning("%s", note)
    if warnings is not None:
        warnings.extend(found + notes)
    check_ranks(strategy.method, [n.rank for n in nodes])
    return nodes


NODES_SETTLE_SECONDS = 2.0
"""Before round 1, how long the count of connected nodes must stay the same before discovery asks
them, unless every partition's node is already there."""


def _settled_node_ids(grid: Grid, node_ids: list[int], expected: int, deadline: float) -> list[int]:
    """The connected nodes once their number has stopped growing: the simulation engine registers
    its nodes while the ServerApp starts (1,000 of them take a moment), and SuperNodes started
    together connect within seconds of each other. Returns at once when ``expected`` nodes are
    there; otherwise when the count has not changed for :data:`NODES_SETTLE_SECONDS` (later
    joiners are found before later rounds)."""
    stable_since = time.time()
    while len(node_ids) < expected and time.time() - stable_since < NODES_SETTLE_SECONDS and time.time() < deadline:
        time.sleep(0.25)
        now = list(grid.get_node_ids())
        if len(now) != len(node_ids):
            node_ids, stable_since = now, time.time()
    return node_ids


@dataclass(frozen=True)
class AcceptedReply:
    """The numbers of one accepted train reply that the round's row is made of."""

    order: tuple[int, int]
    """(partition id, node id): the fixed order scalar sums follow, whatever order replies arrive in."""
    weight: float
    """Aggregation weight: the client's training-set size (``num-examples``), also under DP-SGD's
    Poisson sampling, where the examples a round happened to sample are not a weight (see
    docs/privacy.md); 1 under client-level DP."""
    loss: float | None
    """Mean train loss over the tokens the client used; None when it used none."""
    examples: int
    seconds: float


@dataclass
class Round:
    """One round's bookkeeping while replies stream in: :meth:`take` checks each train reply and
    folds it into the method's aggregate and the ΔW* reference, so what the server holds is the
    method's running sums (streaming methods) rather than the replies."""

    strategy: LoraStrategy
    state: GlobalState
    client_dp: bool = False
    """Client-level DP: updates are held, then clipped and noised together once all have arrived."""
    accepted_replies: list[AcceptedReply] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    held: list = field(default_factory=list)
    aggregate: RoundAggregate = field(init=False)
    ideal: IdealAccumulator = field(init=False, default_factory=IdealAccumulator)

    def __post_init__(self) -> None:
        self.aggregate = self.strategy.accumulator(self.state)

    @property
    def accepted(self) -> int:
        return len(self.accepted_replies)

    def _in_order(self) -> list[AcceptedReply]:
        return sorted(self.accepted_replies, key=lambda r: r.order)

    @property
    def train_seconds(self) -> float:
        """Σ of the accepted replies' own local-training seconds."""
        return sum(r.seconds for r in self._in_order())

    @property
    def train_examples(self) -> int:
        """Examples the accepted replies' local training used (each counted once per use)."""
        return sum(r.examples for r in self.accepted_replies)

    def train_loss(self) -> float | None:
        """The round's train loss: the weighted mean of the accepted replies' losses, by the same
        weights as the aggregate, over the replies that used any tokens, summed in (partition id,
        node id) order so that arrival order cannot change it; None when no reply used data."""
        used = [r for r in self._in_order() if r.loss is not None]
        total = sum(r.weight for r in used)
        return sum(r.weight * r.loss for r in used) / total if used and total > 0 else None

    def take(self, content: RecordDict, start: AdapterState, size: int, who: str,
             order: tuple[int, int] = (0, 0)) -> bool:
        """Check one train reply of ``size`` bytes from a client sent ``start`` and fold it in;
        returns whether it was accepted (if not, the reason is in :attr:`rejected`). ``order``
        (partition id, node id) places the reply's numbers in the round's fixed order."""
        limit = self.strategy.max_reply_bytes(start)
        if size > limit:
            self.rejected.append(f"{who}: oversized reply: {size} bytes > {limit} (strategy.max_reply_bytes)")
            return False
        reason, update, metrics = self.strategy.check_train_reply(content, start)
        if reason:
            self.rejected.append(f"{who}: {reason}")
            return False
        weight = 1.0 if self.client_dp else float(metrics[NUM_EXAMPLES])  # client-level DP: equal weights
        if self.client_dp:
            self.held.append(update)
        else:
            self.aggregate.add(update, weight)
        self.ideal.add(self.strategy.lift(self.state, update), weight)
        loss = float(metrics[TRAIN_LOSS]) if TRAIN_LOSS in metrics else None
        self.accepted_replies.append(AcceptedReply(order, weight, loss, int(metrics.get(TRAIN_EXAMPLES, 0)),
                                                   float(metrics.get(TRAIN_SECONDS, 0.0))))
        return True


def round_messages(strategy: LoraStrategy, state: GlobalState, nodes: list[NodeInfo], starts: dict, rnd: int,
                   cfg: FedloraConfig, frame_sent: set[int], message_type: str) -> list[Message]:
    """One message per node: its starting adapter (the parts its strategy sends), the base terms,
    the Fed-SB frame if the node has not had it yet, and what to train."""
    messages = []
    for node in nodes:
        frame = strategy.frame_for(state, node.rank) if node.node_id not in frame_sent else None
        content = train_content(starts[node.node_id], state.base_terms, strategy.round_config(rnd, node.rank), frame)
        messages.append(Message(content=content, dst_node_id=node.node_id, message_type=message_type))
        if frame is not None:
            frame_sent.add(node.node_id)
    return messages


def record_privacy(reply: Message, run_dir: Path) -> str | None:
    """Append a reply's privacy ledger entry (also when the client declined or the reply is then
    rejected); returns why the reply must be rejected when the entry cannot be read (the client's
    own accountant still holds its privacy cost)."""
    try:
        append_entry(run_dir, json.loads(reply.content[PRIVACY][PRIVACY_ENTRY]))
    except (KeyError, TypeError, ValueError) as err:  # PrivacyError is a ValueError
        return f"malformed privacy entry ({short_error(str(err))})"
    return None


AGG_ERROR_DIGITS = 6
"""Significant digits agg_error is recorded with. ΔW*'s float64 sums follow the replies' arrival
order, which moves an exact method's agg_error (≈1e-8, fp32 rounding) in its 9th digit; six digits
make two runs of one config record the same value. The aggregate itself is float64 sums rounded
once to float32, so arrival order could change one of its entries only where a sum lies within
≈1e-16 (relative) of a float32 rounding boundary."""


def recorded_agg_error(state: GlobalState, new_state: GlobalState, out: Round) -> float:
    """The round's agg_error (relative Frobenius error of its update against ΔW*) as recorded:
    to :data:`AGG_ERROR_DIGITS` significant digits."""
    return float(f"{aggregation_error(round_update(state, new_state), out.ideal.result()):.{AGG_ERROR_DIGITS}g}")


def run_round(grid: Grid, strategy: LoraStrategy, state: GlobalState, nodes: list[NodeInfo], rnd: int,
              cfg: FedloraConfig, frame_sent: set[int], run_dir: Path,
              client_dp: ClientLevelDP | None = None) -> tuple[Round, GlobalState | None, float | None]:
    """Train on ``nodes``; returns the bookkeeping, the new state (None if too few replies) and agg_error."""
    out = Round(strategy, state, client_dp=client_dp is not None)
    starts = {node.node_id: strategy.start_for(state, node.rank) for node in nodes}
    messages = round_messages(strategy, state, nodes, starts, rnd, cfg, frame_sent, MessageType.TRAIN)
    out.bytes_down = sum(content_bytes(m.content) for m in messages)
    by_id = {node.node_id: node for node in nodes}
    replied: set[int] = set()
    for reply in stream_replies(grid, messages, cfg.strategy.round_timeout):
        node = reply.metadata.src_node_id
        replied.add(node)
        who = f"partition {by_id[node].partition_id} (node {node})" if node in by_id else f"node {node}"
        if reply.has_error():
            out.rejected.append(f"{who}: dropped: the client failed or left ({short_error(reply.error.reason)})")
            continue
        size = content_bytes(reply.content)
        out.bytes_up += size
        # The privacy entry goes on record first, whatever becomes of the reply: the update was released.
        problem = record_privacy(reply, run_dir) if PRIVACY in reply.content else None
        if problem:
            out.rejected.append(f"{who}: {problem}")
            continue
        if node not in by_id:
            out.rejected.append(f"{who}: unexpected reply from a node that was not sampled")
            continue
        out.take(reply.content, starts[node], size, who, order=(by_id[node].partition_id, node))
    for node in nodes:
        if node.node_id not in replied:
            out.rejected.append(f"partition {node.partition_id} (node {node.node_id}): straggler: no reply within "
                                f"strategy.round_timeout={cfg.strategy.round_timeout} s")
    for why in out.rejected:
        log.warning("round %d: rejected reply: %s", rnd, why)
    if out.accepted < cfg.strategy.min_clients:
        log.warning("round %d: %d usable replies < min_clients=%d; keeping the previous global adapter",
                    rnd, out.accepted, cfg.strategy.min_clients)
        return out, None, None
    if client_dp:
        start = strategy.start_for(state, nodes[0].rank)
        new_state = client_dp.release(strategy.method, state, start, out.held, run_dir, rnd, cfg.dp.max_grad_norm,
                                      sampled=len(nodes))
        out.held.clear()
    else:
        new_state = out.aggregate.finish()
    return out, new_state, recorded_agg_error(state, new_state, out)


@dataclass
class ServerRun:
    """What the round loop carries from one round to the next (built by :func:`prepare`)."""

    cfg: FedloraConfig
    plan: RunPlan
    strategy: LoraStrategy
    writer: RunWriter
    nodes: list[NodeInfo]
    ranks: list[int]
    client_dp: ClientLevelDP | None
    model: Any
    tokenizer: Any
    eval_examples: list
    state: GlobalState | None = None
    init_cost: dict[str, int] = field(default_factory=dict)
    rng: random.Random = field(default_factory=random.Random)
    frame_sent: set[int] = field(default_factory=set)
    """Nodes that have the Fed-SB frame (a resumed run's clients are fresh processes: none)."""
    node_warnings: list[str] = field(default_factory=list)
    """What node discovery warned about since the last recorded row (partitions no node holds,
    nodes left out): the next ``metrics.jsonl`` row records them as ``node_warnings``."""

    def pop_node_warnings(self) -> dict[str, list[str]]:
        """``{"node_warnings": [...]}`` for the next row (empty when there were none), and forget them."""
        out = {"node_warnings": list(self.node_warnings)} if self.node_warnings else {}
        self.node_warnings.clear()
        return out

    @property
    def meta(self) -> dict[str, Any]:
        """What the global adapter file records beside the adapter."""
        return {"run": self.writer.dir.name, "strategy": self.strategy.name, "base_model": self.cfg.model.name_or_path,
                "lora_alpha": self.cfg.adapter.alpha, "use_rslora": self.cfg.adapter.rslora}

    def evaluate(self) -> dict[str, float]:
        """The global adapter's held-out loss and token accuracy (the server's own evaluation)."""
        result = evaluate_loss(self.model, self.eval_examples, batch_size=self.cfg.eval.batch_size,
                               pad_id=self.tokenizer.pad_token_id, progress=True)
        return {"eval_loss": result.loss, "eval_token_accuracy": result.token_accuracy}


def run_server(grid: Grid, cfg: FedloraConfig, run_dir: str | Path, plan: RunPlan | None = None) -> dict:
    """Run ``cfg.num_rounds`` rounds: :func:`prepare`, :func:`play_round` each round, :func:`finish`.
    ``plan`` is the run's checked inputs when the caller has built them (``fedlora simulate``).
    Returns the run directory and the per-round rows."""
    run = prepare(grid, cfg, run_dir, plan)
    for rnd in range(run.writer.rows[-1]["round"] + 1, cfg.num_rounds + 1):
        play_round(grid, run, rnd)
    return finish(run)


def prepare(grid: Grid, cfg: FedloraConfig, run_dir: str | Path, plan: RunPlan | None = None) -> ServerRun:
    """Everything before round 1: the plan (bad input fails before anything is written), the
    connected nodes, client-level DP, the server's model, and the round-0 state — restored from the
    checkpoint on a resume, else made (Fed-SB's federated init included) and evaluated."""
    plan = plan or plan_run(cfg)
    strategy = LoraStrategy(cfg, plan.method)
    writer = RunWriter(run_dir)
    print(f"fedlora: run directory {writer.dir}", flush=True)
    print(format_partition_stats(plan.partition_stats), flush=True)
    node_warnings: list[str] = []
    nodes = discover(grid, strategy, cfg.strategy.min_clients, partition_stats=plan.partition_stats,
                     warnings=node_warnings)
    ranks = sorted({n.rank for n in nodes})
    if plan.resumed and max(plan.resumed.server["ranks"]) != max(ranks):
        raise CheckpointError(
            f"the checkpoint's global adapter has rank {max(plan.resumed.server['ranks'])} (client ranks "
            f"{plan.resumed.server['ranks']}) but the connected clients have ranks {ranks}; connect the run's clients "
            "(lora-rank in each node config) or start a new run")
    writer.write_config(config_to_dict(cfg))
    save_partition_stats(plan.partition_stats, writer.dir)
    if plan.targets is not None:
        save_target_report(plan.targets, writer.dir)  # which layers adapter.target_modules adapted
    client_dp = None
    if cfg.dp.mode != "none":
        append_entry(writer.dir, run_entry(cfg))
    if cfg.dp.mode == "client":
        client_dp = ClientLevelDP.for_run(cfg.dp, plan.method, ranks, clients_per_round=strategy.num_to_sample(len(nodes)),
                                          population=len(nodes), num_rounds=cfg.num_rounds)
    print(f"fedlora: {len(nodes)} clients, ranks {ranks}, strategy {strategy.name} "
          f"({'exact' if strategy.exact else 'inexact: agg_error reports its real error'})", flush=True)
    model, tokenizer = server_model(cfg, max(ranks))
    eval_examples = tokenize(plan.held_out, tokenizer, cfg, limit=cfg.eval.max_examples)
    run = ServerRun(cfg, plan, strategy, writer, nodes, ranks, client_dp, model, tokenizer, eval_examples,
                    rng=random.Random(cfg.seed), node_warnings=node_warnings)
    if plan.resumed:
        restore_run(run, plan.resumed)
    else:
        start_run(grid, run)
    return run


def server_model(cfg: FedloraConfig, rank: int):
    """The server's model (the global update as plain LoRA at the largest client rank) and tokenizer."""
    model, tokenizer = build_model(cfg, rank=rank, kind="lora")
    quant = model.quant_report
    print(f"fedlora: model on {next(model.parameters()).device}, "
          f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f} M adapter parameters, "
          f"base {quant['base_bytes_after'] / 2**20:.1f} MiB" + (
              f" ({quant['format']}: {quant['bytes_per_param']:.3f} bytes/param on {quant['layers']} layers, "
              f"was {quant['base_bytes_before'] / 2**20:.1f} MiB)" if quant["layers"] else ""), flush=True)
    return model, tokenizer


def start_run(grid: Grid, run: ServerRun) -> None:
    """Round 0 of a new run: the initial state (Fed-SB: from the clients' gradient sketches),
    evaluated, recorded and checkpointed."""
    cfg, strategy = run.cfg, run.strategy
    run.state = strategy.initial_state(get_adapter_state(run.model), min_rank=min(run.ranks))
    if strategy.name == "fedsb" and cfg.strategy.fedsb_init == "federated" and cfg.dp.mode == "none":
        print("fedlora: Fed-SB init round: gradient sketches from the clients …", flush=True)
        run.state, run.init_cost = federated_sb_init(grid, strategy, run.state, run.nodes, min(run.ranks))
        print(f"fedlora: Fed-SB init: {run.init_cost['init_bytes_up'] / 1e3:.1f} KB up, "
              f"{run.init_cost['init_bytes_down'] / 1e3:.1f} KB down in all", flush=True)
    set_adapter_state(run.model, run.state.adapter)
    write_global_adapter(run.writer.dir, run.state, round=0, **run.meta)
    cost = run.init_cost
    run.writer.log_round({"round": 0, "strategy": strategy.name, "clients": cost.get("init_clients", 0),
                          "train_loss": None, **run.evaluate(), "agg_error": None,
                          "bytes_up": cost.get("init_bytes_up", 0), "bytes_down": cost.get("init_bytes_down", 0),
                          "seconds": 0.0, **cost, **run.pop_node_warnings()})
    save_round(run, 0)


def play_round(grid: Grid, run: ServerRun, rnd: int) -> dict:
    """One round: sample the connected nodes, train, aggregate, evaluate, record, checkpoint;
    returns the round's ``metrics.jsonl`` row."""
    cfg, strategy, state = run.cfg, run.strategy, run.state
    started = time.time()
    run.nodes = discover(grid, strategy, cfg.strategy.min_clients, known=run.nodes,  # who is connected now
                         partition_stats=run.plan.partition_stats, warnings=run.node_warnings)
    sampled = strategy.sample(run.nodes, run.rng)
    print(f"fedlora: round {rnd}/{cfg.num_rounds}: training on {len(sampled)} clients …", flush=True)
    stats, new_state, error = run_round(grid, strategy, state, sampled, rnd, cfg, run.frame_sent, run.writer.dir,
                                        run.client_dp)
    row = {"round": rnd, "strategy": strategy.name, "clients": stats.accepted, "rejected": len(stats.rejected),
           "bytes_down": stats.bytes_down, "bytes_up": stats.bytes_up, "agg_error": error,
           "train_loss": None, "eval_loss": None, "train_examples": stats.train_examples,
           "client_train_seconds": round(stats.train_seconds, 3)}
    if new_state is not None:
        fresh = {n: t[len(state.base_terms.get(n, [])):] for n, t in new_state.base_terms.items()}
        side = apply_base_terms(run.model, fresh)
        if side:  # quantized base: what the side-term policy dropped (0 while it only appends)
            row["side_term_error"] = max(r["relative_error"] for r in side)
        set_adapter_state(run.model, new_state.adapter)
        run.state = new_state
        write_global_adapter(run.writer.dir, new_state, round=rnd, **run.meta)
        row["train_loss"] = stats.train_loss()
        row.update(run.evaluate())
        if cfg.eval.client_eval:
            row.update(client_eval(grid, strategy, new_state, sampled, rnd, cfg, run.frame_sent))
    else:
        row["skipped"] = True  # too few usable replies: the previous global adapter stays
    if stats.rejected:
        row["rejected_reasons"] = stats.rejected
    row.update(run.pop_node_warnings())
    if cfg.dp.mode != "none":
        row["epsilon"] = worst_epsilon(run.writer.dir)
    row["seconds"] = round(time.time() - started, 2)
    run.writer.log_round(row)
    save_round(run, rnd)
    return row


def finish(run: ServerRun) -> dict:
    """After the last round: GSM8K accuracy when asked, the PEFT adapter, plots, the privacy
    report, summary, manifest and report.md. Raises when no round got enough usable replies."""
    cfg, writer, model = run.cfg, run.writer, run.model
    if not any(r.get("eval_loss") is not None for r in writer.rows[1:]):
        raise RuntimeError("no round got enough usable client replies; see the rejected replies logged above")
    device = str(next(model.parameters()).device)
    extra = {"strategy": run.strategy.name, "exact": run.strategy.exact, **run.init_cost, "quant": model.quant_report,
             "model": cfg.model.name_or_path, "dataset": cfg.dataset.name, "device": device, "client_ranks": run.ranks,
             "skipped_data_rows": run.plan.partition_stats.get("skipped_rows", 0)}
    if cfg.eval.gsm8k_problems > 0:
        rows = run.plan.held_out.select(range(min(cfg.eval.gsm8k_problems, len(run.plan.held_out))))
        problems = [format_example(r, cfg.dataset) for r in rows]
        extra["gsm8k"] = gsm8k_accuracy(model, run.tokenizer, problems, max_new_tokens=cfg.eval.max_new_tokens,
                                        progress=True)
        print(f"fedlora: GSM8K exact match {extra['gsm8k']['correct']}/{extra['gsm8k']['total']}", flush=True)
    adapter_dir = save_peft_adapter(export_state(run.state, cfg.adapter.alpha, cfg.adapter.rslora), cfg.adapter,
                                    writer.dir / ADAPTER_DIR, base_model=cfg.model.name_or_path,
                                    fan_in_fan_out=run.plan.targets is not None and peft_fan_in_fan_out(run.plan.targets))
    writer.plot()
    if cfg.dp.mode != "none":
        paths = write_privacy_report(writer.dir)
        extra["privacy_report"] = {k: str(v) for k, v in paths.items()}
        print(f"fedlora: privacy report: {', '.join(p.name for p in paths.values())}", flush=True)
    summary_path = writer.write_summary(extra | {"adapter_dir": str(adapter_dir)}, planned_rounds=cfg.num_rounds)
    for caveat in json.loads(summary_path.read_text())["caveats"]:
        log.warning("this run is not clean: %s", caveat)
    run_manifest = manifest(config_to_dict(cfg), run.plan.partition_stats, device)
    writer.write_manifest(run_manifest)
    write_report(writer.dir, config_to_dict(cfg), format_partition_stats(run.plan.partition_stats), writer.rows,
                 json.loads(summary_path.read_text()), run_manifest)
    print(f"fedlora: done; results in {writer.dir} ({REPORT_FILE}, {summary_path.name}, {METRICS_FILE}, {ADAPTER_DIR}/, "
          f"{LOSS_PLOT_FILE})", flush=True)
    return {"run_dir": str(writer.dir), "rows": writer.rows}


def save_round(run: ServerRun, rnd: int) -> Path:
    """Checkpoint the server after round ``rnd`` (its metrics row already written)."""
    rng_state, rng_tensors = capture_rng(run.rng)
    server = {"ranks": run.ranks, "init_cost": run.init_cost,
              "client_level_accountant": run.client_dp.checkpoint() if run.client_dp else None,
              "wall_seconds": round(time.time() - run.writer.started, 3)}
    inputs = run.plan.resumed.inputs if run.plan.resumed else None  # as the resume verified them (None: measured)
    return save_checkpoint(run.writer.dir, Checkpoint(rnd, run.state, config_to_dict(run.cfg), list(run.writer.rows),
                                                      rng_state, rng_tensors, ledger_position(run.writer.dir), server,
                                                      inputs=inputs))


def restore_run(run: ServerRun, ckpt: Checkpoint) -> None:
    """Put a checked checkpoint back: the server model, RNGs, the writer's rows and clock (rows
    past the checkpoint are dropped), the client-level accountant, the Fed-SB init cost."""
    run.state = ckpt.state
    apply_base_terms(run.model, run.state.base_terms)
    set_adapter_state(run.model, run.state.adapter)
    restore_rng(ckpt.rng, ckpt.rng_tensors, run.rng)
    run.writer.restore(ckpt.metrics, float(ckpt.server.get("wall_seconds", 0.0)))
    if run.client_dp is not None:
        run.client_dp.restore(ckpt.server.get("client_level_accountant"), run.writer.dir)
    run.init_cost = dict(ckpt.server.get("init_cost", {}))
    later = ledger_entries_since(run.writer.dir, ckpt.ledger)
    if later > 0:
        print(f"fedlora: {later} privacy ledger entries were written after round {ckpt.round} was saved (an interrupted "
              "round); they stay, so privacy spent then stays counted", flush=True)
    write_global_adapter(run.writer.dir, run.state, round=ckpt.round, **run.meta)
    print(f"fedlora: resuming after round {ckpt.round} from {ckpt.path}", flush=True)
    print(run.writer.table_header() + "\n" + "\n".join(run.writer.table_row(r) for r in run.writer.rows), flush=True)


def client_eval(grid: Grid, strategy: LoraStrategy, state: GlobalState, nodes: list[NodeInfo], rnd: int,
                cfg: FedloraConfig, frame_sent: set[int]) -> dict:
    """Clients' own held-out loss of the new global adapter, weighted by their token counts."""
    starts = {node.node_id: strategy.start_for(state, node.rank) for node in nodes}
    messages = round_messages(strategy, state, nodes, starts, rnd, cfg, frame_sent, MessageType.EVALUATE)
    down = sum(content_bytes(m.content) for m in messages)
    partition = {node.node_id: node.partition_id for node in nodes}
    results, up = [], 0  # (partition id, node id, loss, tokens): summed in that order, not arrival order
    for reply in stream_replies(grid, messages, cfg.strategy.round_timeout):
        if reply.has_error():
            log.warning("evaluate reply from node %s: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        up += content_bytes(reply.content)
        m, node = reply.content[METRICS], reply.metadata.src_node_id
        results.append((partition.get(node, -1), node, float(m[EVAL_LOSS]), float(m[EVAL_TOKENS])))
    if not results:
        return {}
    results.sort()
    return {"client_eval_loss": sum(l * w for *_, l, w in results) / sum(w for *_, w in results),
            "eval_bytes_down": down, "eval_bytes_up": up}
