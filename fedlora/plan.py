"""What a run is checked against before any work: :class:`RunPlan`, built once by :func:`plan_run`.

``fedlora simulate`` builds the plan before Flower's engine starts (so bad input fails with the
run directory untouched) and hands it to the ServerApp, which builds the same plan itself when it
is started any other way (``flwr run``). The strategy, the resume checkpoint, the train / held-out
splits and the partitions are therefore made once per run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import datasets

from fedlora.aggregation import Method, resolve_method
from fedlora.config import FedloraConfig, config_to_dict
from fedlora.data.partition import partition_dataset, partition_stats
from fedlora.data.splits import load_splits
from fedlora.privacy import check_client_level_strategy
from fedlora.rundir.checkpoint import Checkpoint, prepare_resume


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
    """Examples (and label/bucket histograms) per client of the simulated partitioning."""


def plan_run(cfg: FedloraConfig) -> RunPlan:
    """Check ``cfg`` whole before any work: the strategy against the config (and client-level DP),
    a resume checkpoint against the config, the data and its partitioning. Raises ``ConfigError``,
    ``CheckpointError`` or ``DataError`` naming the problem; writes nothing."""
    method = resolve_method(cfg)
    if cfg.dp.mode == "client":
        check_client_level_strategy(method.name)
    resumed = prepare_resume(cfg.resume, config_to_dict(cfg)) if cfg.resume else None
    train, held_out = load_splits(cfg)
    stats = partition_stats(partition_dataset(train, cfg.dataset, cfg.num_clients), cfg.dataset)
    return RunPlan(cfg, method, resumed, train, held_out, stats)
