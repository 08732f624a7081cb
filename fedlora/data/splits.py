"""Each side's data: the fixed train / held-out split, every client's partition of it and its
tokenised examples (cached per worker process, :mod:`fedlora.worker_cache`).

Everything the data needs is checked before the first round (file readable, columns present,
every row usable, enough rows for the clients), so bad input fails fast with a clear error. Bad
rows are checked (and, with ``dataset.bad_rows=skip``, dropped) on the whole file before the
split, so the server and every client split and partition the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import datasets

from fedlora.config import FedloraConfig
from fedlora.data.partition import partition_dataset
from fedlora.data.records import BadRow, load_records, split_train_eval, tokenize_dataset, usable_rows
from fedlora.model.loading import load_tokenizer
from fedlora.worker_cache import EXAMPLES, PARTITIONS, _file_stamp

Examples = list[dict[str, list[int]]]


def checked_records(cfg: FedloraConfig, tokenizer: Any = None) -> tuple[datasets.Dataset, list[BadRow]]:
    """The configured data with its bad rows refused or dropped (:func:`~fedlora.data.records.usable_rows`),
    and the dropped rows. Without a ``tokenizer`` only the raw values are checked, except with
    ``dataset.bad_rows=skip``, where the tokenizer ``cfg.model`` names is loaded (no weights) so
    every process drops exactly the rows the server dropped."""
    if tokenizer is None and cfg.dataset.bad_rows == "skip":
        tokenizer = load_tokenizer(cfg.model)
    return usable_rows(load_records(cfg.dataset), cfg.dataset, tokenizer)


def load_splits(cfg: FedloraConfig, tokenizer: Any = None) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The fixed train / held-out split of the configured dataset's usable rows (:func:`checked_records`)."""
    return split_train_eval(checked_records(cfg, tokenizer)[0], cfg.dataset)


@dataclass
class _Partitions:
    """Every client's training rows, and the held-out split whose IID shares are cut on first use."""

    train: list[datasets.Dataset]
    held_out: datasets.Dataset
    eval_cfg: Any
    eval_parts: list[datasets.Dataset] | None = field(default=None)

    def eval_share(self, partition_id: int) -> datasets.Dataset:
        n = len(self.train)
        if self.eval_parts is None and 0 < len(self.held_out) < n:  # more clients than rows: row i mod rows
            return self.held_out.select([partition_id % len(self.held_out)])
        if self.eval_parts is None:
            self.eval_parts = partition_dataset(self.held_out, self.eval_cfg, n)
        return self.eval_parts[partition_id]


def _partitions(cfg: FedloraConfig, num_partitions: int, data_path: str | None) -> _Partitions:
    if data_path:  # a deployed node's own file: all of it is this node's
        own = replace(cfg, dataset=replace(cfg.dataset, path=data_path))
        train, held_out = load_splits(own, load_tokenizer(cfg.model))  # no server checked this file
        return _Partitions([train], held_out, own.dataset, [held_out])
    train, held_out = load_splits(cfg)
    eval_cfg = replace(cfg.dataset, partitioner="iid", partition_by=None)
    return _Partitions(partition_dataset(train, cfg.dataset, num_partitions), held_out, eval_cfg)


def _client_partitions(cfg: FedloraConfig, num_partitions: int, data_path: str | None) -> _Partitions:
    path = data_path or cfg.dataset.path
    key = repr((cfg.dataset, _file_stamp(path), num_partitions, data_path, _tokenizer_source(cfg)))
    return PARTITIONS.get(key, lambda: _partitions(cfg, num_partitions, data_path))


def _tokenizer_source(cfg: FedloraConfig) -> tuple:
    """What decides the tokenizer, and so which rows the token check drops (``bad_rows=skip``)."""
    m = cfg.model
    return (m.name_or_path, m.gguf_package, m.gguf_file, m.cache_dir)


def client_split(
    cfg: FedloraConfig, partition_id: int, num_partitions: int, data_path: str | None = None, split: str = "train"
) -> datasets.Dataset:
    """A client's ``train`` rows or its ``eval`` share of held-out rows (see :func:`client_datasets`)."""
    parts = _client_partitions(cfg, num_partitions, data_path)
    index = 0 if data_path else partition_id
    return parts.train[index] if split == "train" else parts.eval_share(index)


def client_datasets(
    cfg: FedloraConfig, partition_id: int, num_partitions: int, data_path: str | None = None
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """A client's training rows and its share of held-out rows.

    In simulation the client takes partition ``partition_id`` of the shared train split (by the
    configured partitioner) and the same IID share of the held-out split (with more clients than
    held-out rows, client i gets row i mod rows). A deployed node that points ``data-path`` at its
    own file uses all of that file, split train/held-out like the shared data. The partitions are
    computed once per process (cached).
    """
    return (client_split(cfg, partition_id, num_partitions, data_path, "train"),
            client_split(cfg, partition_id, num_partitions, data_path, "eval"))


def client_examples(
    cfg: FedloraConfig, tokenizer, partition_id: int, num_partitions: int, data_path: str | None = None,
    split: str = "train", limit: int = 0,
) -> Examples:
    """:func:`tokenize` of :func:`client_split`, tokenised once per process (cached; ``tokenizer``
    must be the one ``cfg.model`` loads). The list is the caller's; the examples are shared and
    must not be modified."""
    path = data_path or cfg.dataset.path
    key = repr((cfg.dataset, _file_stamp(path), num_partitions, data_path, partition_id if not data_path else 0,
                split, limit, *_tokenizer_source(cfg)))

    def make() -> Examples:
        return tokenize(client_split(cfg, partition_id, num_partitions, data_path, split), tokenizer, cfg, limit)

    return list(EXAMPLES.get(key, make, weight=lambda ex: sum(2 * len(e["input_ids"]) for e in ex)))


def tokenize(ds: datasets.Dataset, tokenizer, cfg: FedloraConfig, limit: int = 0) -> Examples:
    """Tokenised prompt/response examples (the first ``limit`` rows when ``limit`` > 0)."""
    if limit and len(ds) > limit:
        ds = ds.select(range(limit))
    return tokenize_dataset(ds, tokenizer, cfg.dataset)
