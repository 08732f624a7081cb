"""What a run is checked against before any work: :class:`RunPlan`, built once by :func:`plan_run`.

``fedlora simulate`` builds the plan before Flower's engine starts (so bad input fails with the
run directory untouched) and hands it to the ServerApp, which builds the same plan itself when it
is started any other way (``flwr run``). The strategy, the resume checkpoint, every row of the
data (with the model's tokenizer, never its weights), the train / held-out splits and the
partitions are therefore made once per run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import datasets

from fedlora.aggregation import Method, resolve_method
from fedlora.config import FedloraConfig, config_to_dict
from fedlora.data.partition import partition_dataset, partition_stats
from fedlora.data.records import BadRow, describe_bad_rows, load_records, split_train_eval, usable_rows
from fedlora.adapters.targets import TargetReport
from fedlora.model.loading import load_tokenizer
from fedlora.model.targets import check_targets
from fedlora.privacy import check_client_level_strategy
from fedlora.rundir.checkpoint import Checkpoint, prepare_resume

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPlan:
    """A run's checked inputs."""

    cfg: FedloraConfig
    method: Method
    resumed: Checkpoint | None
    """The checkpoint a ``resume=`` run continues from, read and checked (None for a new run)."""
    train: datasets.Dataset
    held_out: datasets.Dataset
    partition_stats: dict[str, Any]
    """Examples (and label/bucket histograms) per client of the simulated partitioning, and
    ``skipped_rows``: how many rows ``dataset.bad_rows=skip`` dropped (0 otherwise)."""
    skipped_rows: tuple[BadRow, ...] = ()
    """The rows ``dataset.bad_rows=skip`` dropped (row number in file order, column, problem)."""
    targets: TargetReport | None = None
    """The layers ``adapter.target_modules`` resolved to, per pattern (:func:`~fedlora.model.targets.check_targets`)."""


def plan_run(cfg: FedloraConfig) -> RunPlan:
    """Check ``cfg`` whole before any work: the strategy against the config (and client-level DP),
    the adapter's target patterns against the model's layers (its skeleton, no weights), a resume
    checkpoint against the config, every row of the data (:func:`~fedlora.data.records.usable_rows`, with
    the tokenizer of ``cfg.model``, loaded without weights) and its partitioning. Raises
    ``ConfigError``, ``TargetError``, ``CheckpointError``, ``DataError`` or ``ModelError`` naming the
    problem; writes nothing. Logs the dropped rows once when ``dataset.bad_rows=skip`` drops any."""
    method = resolve_method(cfg)
    if cfg.dp.mode == "client":
        check_client_level_strategy(method.name)
    targets = check_targets(cfg)  # adapter.target_modules on the model's weightless skeleton
    resumed = prepare_resume(cfg.resume, config_to_dict(cfg)) if cfg.resume else None
    records = load_records(cfg.dataset)
    if cfg.dataset.bad_rows == "error":
        usable_rows(records, cfg.dataset)  # the raw values first: a null response fails before the tokenizer loads
    records, skipped = usable_rows(records, cfg.dataset, load_tokenizer(cfg.model))
    if skipped:
        logger.warning("dataset.bad_rows=skip: training without %s", describe_bad_rows(skipped, len(records) + len(skipped)))
    train, held_out = split_train_eval(records, cfg.dataset)
    stats = partition_stats(partition_dataset(train, cfg.dataset, cfg.num_clients), cfg.dataset)
    stats["skipped_rows"] = len(skipped)
    return RunPlan(cfg, method, resumed, train, held_out, stats, tuple(skipped), targets)
