"""fedlora's Flower ClientApp: load the base + adapter, train or evaluate locally, reply.

Per-node settings (partition, rank, data path, device) come from the node config
(:func:`fedlora.config.node_settings`); everything else from the run config.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedlora.adapters import get_adapter_state, set_adapter_state
from fedlora.base_terms import apply_base_terms
from fedlora.config import FedloraConfig, NodeSettings, config_from_run_config, node_settings
from fedlora.evaluation import evaluate_loss
from fedlora.messages import read_train_content, reply_content
from fedlora.training import train_local
from fedlora.workspace import build_model, client_datasets, tokenize


def _setup(msg: Message, context: Context, cfg: FedloraConfig | None):
    cfg = cfg if cfg is not None else config_from_run_config(dict(context.run_config))
    node = node_settings(dict(context.node_config), cfg)
    if node.device:
        cfg = replace(cfg, model=replace(cfg.model, device=node.device))
    if cfg.client_cpus >= 1:
        torch.set_num_threads(int(cfg.client_cpus))  # share the machine with the other clients
    model, tokenizer = build_model(cfg, rank=node.rank)
    adapter, base_terms, round_config = read_train_content(msg.content)
    apply_base_terms(model, base_terms)
    set_adapter_state(model, adapter)
    train_ds, eval_ds = client_datasets(cfg, node.partition_id, node.num_partitions, node.data_path)
    return cfg, node, model, tokenizer, round_config, train_ds, eval_ds


def client_seed(cfg: FedloraConfig, node: NodeSettings, round_index: int) -> int:
    return cfg.seed * 1_000_003 + round_index * 1_009 + node.partition_id


def make_client_app(cfg: FedloraConfig | None = None) -> ClientApp:
    """A ClientApp bound to ``cfg``, or reading Flower's run config when ``cfg`` is None."""
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        run_cfg, node, model, tokenizer, rc, train_ds, _ = _setup(msg, context, cfg)
        examples = tokenize(train_ds, tokenizer, run_cfg)
        rnd, steps = int(rc["round"]), run_cfg.train.local_steps

        def progress(step: int, loss: float) -> None:
            print(f"client {node.partition_id} round {rnd}: step {step}/{steps} loss {loss:.4f}", flush=True)

        result = train_local(
            model, examples, run_cfg.train, pad_id=tokenizer.pad_token_id,
            round_index=rnd, num_rounds=int(rc["num_rounds"]),
            seed=client_seed(run_cfg, node, rnd), on_step=progress,
        )
        metrics = {"num-examples": len(examples), "train_loss": result.loss, "train_tokens": result.tokens,
                   "train_seconds": result.seconds, "rank": node.rank}
        return Message(reply_content(get_adapter_state(model), metrics), reply_to=msg)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        run_cfg, _, model, tokenizer, _, _, eval_ds = _setup(msg, context, cfg)
        examples = tokenize(eval_ds, tokenizer, run_cfg, limit=run_cfg.eval.max_examples)
        result = evaluate_loss(model, examples, batch_size=run_cfg.eval.batch_size, pad_id=tokenizer.pad_token_id)
        metrics = {"num-examples": len(examples), "eval_loss": result.loss, "eval_tokens": result.tokens}
        return Message(reply_content(None, metrics), reply_to=msg)

    return client_app


app = make_client_app()
