"""fedlora's Flower ClientApp: load the base + adapter, train or evaluate locally, reply.

Per-node settings (partition, rank, data path, device) come from the node config
(:func:`fedlora.config.node_settings`); everything else from the run config. The server says in
each message which adapter kind to train and which parts of it travel.
"""

from __future__ import annotations

import json
from dataclasses import replace

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora.adapters import get_adapter_state, set_adapter_state
from fedlora.adapters.sb import set_sb_frame
from fedlora.adapters.base_terms import apply_base_terms
from fedlora.config import FedloraConfig, NodeSettings, config_from_run_config, node_settings
from fedlora.training.evaluation import evaluate_loss
from fedlora.protocol.messages import (
    BASIS,
    CONFIG,
    EVAL_LOSS,
    EVAL_TOKENS,
    FRAME,
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
    SB_SKETCH,
    SKETCH,
    TRAIN_EXAMPLES,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    TRAIN_TOKENS,
    RoundConfig,
    SBInitQuery,
    arrays_to_frame,
    from_array_record,
    read_train_content,
    reply_content,
    to_array_record,
)
from fedlora.privacy import STATE_KEY, example_entry, persist_client_state, restore_client_state, train_local_dp
from fedlora.aggregation.fedsb_init import client_projection, client_range_sketch, draw_sketch
from fedlora.training.local import dense_gradients, train_local
from fedlora.data.records import share_reports_within_run
from fedlora.data.splits import client_examples, client_split
from fedlora.model.build import build_model


def _config(context: Context, cfg: FedloraConfig | None) -> tuple[FedloraConfig, NodeSettings]:
    cfg = cfg if cfg is not None else config_from_run_config(dict(context.run_config))
    node = node_settings(dict(context.node_config), cfg)
    share_reports_within_run(context.run_id)  # one truncation line per client and run, not per message
    if node.device:
        cfg = replace(cfg, model=replace(cfg.model, device=node.device))
    if cfg.client_cpus >= 1:
        torch.set_num_threads(int(cfg.client_cpus))  # share the machine with the other clients
    return cfg, node


def _setup(msg: Message, context: Context, cfg: FedloraConfig | None):
    """The run config, this node's settings, and a private copy of the process's cached base with a
    fresh adapter loaded from the server's message (base terms applied to the copy only)."""
    cfg, node = _config(context, cfg)
    rc = RoundConfig.from_record(msg.content[CONFIG])
    model, tokenizer = build_model(cfg, rank=node.rank, kind=rc.adapter_kind, reuse=True)
    if rc.adapter_kind == "sb":
        # The fixed frame arrives once; the node keeps it in its persistent state.
        if FRAME in msg.content:
            context.state[FRAME] = msg.content[FRAME]
        if FRAME not in context.state:
            raise RuntimeError("this node has no Fed-SB frame; the server must send it")
        set_sb_frame(model, arrays_to_frame(from_array_record(context.state[FRAME])))
    start, base_terms = read_train_content(msg.content, like=get_adapter_state(model))
    apply_base_terms(model, base_terms)
    set_adapter_state(model, start)
    return cfg, node, model, tokenizer, rc


def _examples(cfg: FedloraConfig, node: NodeSettings, tokenizer, split: str, limit: int = 0):
    """This node's tokenised ``train`` or ``eval`` examples (prepared once per process)."""
    return client_examples(cfg, tokenizer, node.partition_id, node.num_partitions, node.data_path, split, limit)


def train_private(model, examples, cfg: FedloraConfig, node: NodeSettings, context: Context, rnd: int, kwargs: dict):
    """DP-SGD for one round, continuing this client's accountant (kept in the node's state and on
    disk, and saved before the reply leaves so a released update is always on record)."""
    record = context.state[STATE_KEY] if STATE_KEY in context.state else None
    accountant = restore_client_state(record["state"] if record else None, cfg.run_dir, node.partition_id)
    result, accountant = train_local_dp(model, examples, cfg.train, cfg.dp, accountant_state=accountant, **kwargs)
    context.state[STATE_KEY] = ConfigRecord({"state": persist_client_state(accountant, cfg.run_dir, node.partition_id)})
    entry = example_entry(result, accountant, round_index=rnd, client=node.partition_id)
    return result, {"metrics": result.metrics(), "entry": json.dumps(entry)}


def sb_init_pass(cfg: FedloraConfig, node: NodeSettings, msg: Message, q: SBInitQuery) -> RecordDict:
    """Fed-SB init: this client's gradient G_i on its first examples, sent only through thin
    sketches, Y_i = G_i·Ω (pass 1) or Z_i = Qᵀ·G_i (pass 2). The same examples are used in both
    passes, so G_i is the same matrix."""
    model, tokenizer = build_model(cfg, kind="lora", reuse=True)
    examples = _examples(cfg, node, tokenizer, "train", limit=q.n_examples)
    grads = dense_gradients(model, examples, batch_size=cfg.train.batch_size, pad_id=tokenizer.pad_token_id)
    if q.query == SB_SKETCH:
        out = {}
        for name, g in grads.items():
            omega = draw_sketch(g.shape[1], min(q.width, *g.shape), q.seed)
            out[name] = client_range_sketch(g, omega).numpy()
    else:  # SB_PROJECT (SBInitQuery.from_record admits no other)
        basis = from_array_record(msg.content[BASIS])
        out = {name: client_projection(g, torch.from_numpy(basis[name])).numpy() for name, g in grads.items()}
    return RecordDict({SKETCH: to_array_record(out), METRICS: MetricRecord({NUM_EXAMPLES: len(examples)})})


def client_seed(cfg: FedloraConfig, node: NodeSettings, round_index: int) -> int:
    return cfg.seed * 1_000_003 + round_index * 1_009 + node.partition_id


def make_client_app(cfg: FedloraConfig | None = None) -> ClientApp:
    """A ClientApp bound to ``cfg``, or reading Flower's run config when ``cfg`` is None."""
    client_app = ClientApp()

    @client_app.query()
    def query(msg: Message, context: Context) -> Message:
        """Node discovery (partition, rank, data size), or a pass of Fed-SB's init round."""
        run_cfg, node = _config(context, cfg)
        if msg.content[CONFIG][QUERY] == NODE_INFO:
            train_ds = client_split(run_cfg, node.partition_id, node.num_partitions, node.data_path, "train")
            metrics = {PARTITION_ID: node.partition_id, RANK: node.rank, NUM_EXAMPLES: len(train_ds),
                       NUM_PARTITIONS: node.num_partitions, OWN_DATA: int(node.data_path is not None)}
            return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)
        return Message(sb_init_pass(run_cfg, node, msg, SBInitQuery.from_record(msg.content[CONFIG])), reply_to=msg)

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        run_cfg, node, model, tokenizer, rc = _setup(msg, context, cfg)
        examples = _examples(run_cfg, node, tokenizer, "train")
        rnd, steps = rc.round, run_cfg.train.local_steps

        def progress(step: int, loss: float) -> None:
            print(f"client {node.partition_id} round {rnd}: step {step}/{steps} loss {loss:.4f}", flush=True)

        kwargs = dict(pad_id=tokenizer.pad_token_id, round_index=rnd, num_rounds=rc.num_rounds,
                      seed=client_seed(run_cfg, node, rnd), on_step=progress)
        privacy = None
        if run_cfg.dp.mode == "example":
            result, privacy = train_private(model, examples, run_cfg, node, context, rnd, kwargs)
        else:
            result = train_local(model, examples, run_cfg.train, **kwargs)
        metrics = {NUM_EXAMPLES: len(examples), TRAIN_EXAMPLES: result.examples, TRAIN_TOKENS: result.tokens,
                   TRAIN_SECONDS: result.seconds, RANK: node.rank, PARTITION_ID: node.partition_id}
        if result.tokens > 0:  # a loss over no tokens (DP-SGD steps that all sampled nothing) is not sent
            metrics[TRAIN_LOSS] = result.loss
        content = reply_content(get_adapter_state(model), metrics | (privacy or {}).get("metrics", {}), rc.parts)
        if privacy is not None:
            content[PRIVACY] = ConfigRecord({PRIVACY_ENTRY: privacy["entry"]})
        return Message(content, reply_to=msg)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        run_cfg, node, model, tokenizer, _ = _setup(msg, context, cfg)
        examples = _examples(run_cfg, node, tokenizer, "eval", limit=run_cfg.eval.max_examples)
        result = evaluate_loss(model, examples, batch_size=run_cfg.eval.batch_size, pad_id=tokenizer.pad_token_id)
        metrics = {NUM_EXAMPLES: len(examples), EVAL_LOSS: result.loss, EVAL_TOKENS: result.tokens,
                   PARTITION_ID: node.partition_id}
        return Message(reply_content(None, metrics), reply_to=msg)

    return client_app


app = make_client_app()
