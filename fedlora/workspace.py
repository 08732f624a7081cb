"""Set-up shared by the server and the clients: the adapted model and each side's data.

Everything a run needs is checked here before the first round (data readable, columns present,
patterns match, ranks fit, enough rows for the clients), so bad input fails fast with a clear error.
"""

from __future__ import annotations

from dataclasses import replace

import datasets

from fedlora.adapters import adapter_class, inject_adapters
from fedlora.config import FedloraConfig
from fedlora.data import load_records, split_train_eval, tokenize_dataset
from fedlora.models import load_model
from fedlora.partition import partition_dataset
from fedlora.quant import quantize_model

Examples = list[dict[str, list[int]]]


def build_model(cfg: FedloraConfig, rank: int | None = None, kind: str | None = None):
    """The frozen base with adapters of ``kind`` (default ``cfg.adapter.kind``) and ``rank``
    (default ``cfg.adapter.rank``) injected, the adapted layers' base quantized per ``cfg.quant``
    (the model's ``quant_report`` attribute says what that saved)."""
    model, tokenizer = load_model(cfg.model)
    inject_adapters(model, cfg.adapter, adapter_class(kind or cfg.adapter.kind), rank=rank)
    model.quant_report = quantize_model(model, cfg.quant, cfg.adapter.target_modules)
    return model, tokenizer


def load_splits(cfg: FedloraConfig) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The fixed train / held-out split of the configured dataset."""
    return split_train_eval(load_records(cfg.dataset), cfg.dataset)


def client_datasets(
    cfg: FedloraConfig, partition_id: int, num_partitions: int, data_path: str | None = None
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """A client's training rows and its share of held-out rows.

    In simulation the client takes partition ``partition_id`` of the shared train split (by the
    configured partitioner) and the same IID share of the held-out split. A deployed node that
    points ``data-path`` at its own file uses all of that file, split train/held-out like the
    shared data.
    """
    if data_path:
        own = replace(cfg.dataset, path=data_path)
        return split_train_eval(load_records(own), own)
    train, held_out = load_splits(cfg)
    train_part = partition_dataset(train, cfg.dataset, num_partitions)[partition_id]
    eval_cfg = replace(cfg.dataset, partitioner="iid", partition_by=None)
    eval_part = partition_dataset(held_out, eval_cfg, num_partitions)[partition_id]
    return train_part, eval_part


def tokenize(ds: datasets.Dataset, tokenizer, cfg: FedloraConfig, limit: int = 0) -> Examples:
    """Tokenised prompt/response examples (the first ``limit`` rows when ``limit`` > 0)."""
    if limit and len(ds) > limit:
        ds = ds.select(range(limit))
    return tokenize_dataset(ds, tokenizer, cfg.dataset)
