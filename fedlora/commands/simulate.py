"""Run a federation in Flower's simulation engine on this machine."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from fedlora.config import FedloraConfig
from fedlora.plan import RunPlan, plan_run


def preflight(cfg: FedloraConfig) -> RunPlan:
    """Fail on bad strategy, data, partitioning or checkpoint before the simulation engine starts;
    returns the checked plan, which the ServerApp then uses instead of building it again."""
    plan = plan_run(cfg)  # a corrupt or incompatible resume is refused here, with the run directory untouched
    if plan.resumed:
        print(f"fedlora: resuming {cfg.resume} after round {plan.resumed.round} of {cfg.num_rounds}", flush=True)
    return plan


def client_gpu_fraction(cfg: FedloraConfig) -> float:
    """GPU share per simulated client: as configured, or split one GPU between up to 4 clients."""
    if cfg.client_gpus > 0 or not torch.cuda.is_available():
        return cfg.client_gpus
    return 1.0 / min(cfg.num_clients, 4)


def local_cpus() -> int:
    """Cores this process may run on (``taskset``/cpusets respected, unlike ``os.cpu_count``)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def backend_config(cfg: FedloraConfig) -> dict:
    """Flower's Ray backend settings. With ``RAY_ADDRESS`` set (``HOST:6379`` of a head started with
    ``ray start --head``) the simulation joins that cluster, and Ray sizes the pool of client workers
    from every node's resources (Ray refuses ``num_cpus`` when joining). Otherwise a private local
    Ray instance on this machine's cores: ``address="local"``, so a cluster someone started here
    with ``ray start`` is never joined by accident. See docs/simulation.md."""
    resources = {"num_cpus": cfg.client_cpus, "num_gpus": client_gpu_fraction(cfg)}
    if os.environ.get("RAY_ADDRESS"):
        return {"client_resources": resources, "init_args": {"address": os.environ["RAY_ADDRESS"]}}
    return {"client_resources": resources,
            "init_args": {"address": "local", "num_cpus": local_cpus(), "include_dashboard": False}}


def server_threads(cfg: FedloraConfig, cpus: int) -> int:
    """Torch threads for the ServerApp, which runs in this process beside client workers that claim
    ``client_cpus`` cores each: the cores they leave, at least 1. A 2-thread server beside two busy
    workers on 2 cores stalls on every small op (the per-reply ΔW* took 96 ms instead of 0.4 ms)."""
    workers = int(cpus // cfg.client_cpus) if cfg.client_cpus > 0 else cpus
    if (gpu := client_gpu_fraction(cfg)) > 0:
        workers = min(workers, int(torch.cuda.device_count() / gpu))
    return max(1, int(cpus - min(workers, cfg.num_clients) * cfg.client_cpus))


RUN_SIMULATION_DEPRECATION = "The `run_simulation` function is deprecated"
"""How Flower 1.42 starts its one-time notice on ``flwr.simulation.run_simulation`` (logged through
``warn_deprecated_feature`` as ``"DEPRECATED FEATURE: %s"`` with this text in the argument)."""


def _is_run_simulation_notice(record: logging.LogRecord) -> bool:
    return (str(record.msg).startswith("DEPRECATED FEATURE:")
            and any(RUN_SIMULATION_DEPRECATION in str(arg) for arg in record.args or ()))


@contextmanager
def without_run_simulation_notice():
    """Drop Flower's deprecation notice for ``run_simulation``, and only that record, from the
    ``flwr`` logger for the block; every other Flower message (other deprecations included) passes.

    Why: Flower 1.42 has no supported in-process simulation entry point. ``run_simulation`` is
    deprecated in favour of ``flwr run`` against a SuperLink, which builds the apps itself from
    ``pyproject.toml``'s flat run config, so it cannot take the typed ``FedloraConfig`` built from
    Hydra here, nor the ``client_app`` tests pass in. The other entry points of ``flwr.simulation``
    are the deprecated legacy ``start_simulation`` and ``run_simulation_process``, the process a
    SuperLink launches, which needs its SimulationIo API and a token. Until Flower ships an
    in-process replacement, ``fedlora simulate`` keeps calling ``run_simulation`` and this notice,
    which the user cannot act on, is withheld (README: "Why `fedlora simulate` uses run_simulation").
    """
    flwr_logger = logging.getLogger("flwr")
    notice_filter = lambda record: not _is_run_simulation_notice(record)  # noqa: E731
    flwr_logger.addFilter(notice_filter)
    try:
        yield
    finally:
        flwr_logger.removeFilter(notice_filter)


def simulate(cfg: FedloraConfig, run_dir: str | Path, client_app=None) -> None:
    """Run ``cfg`` with ``cfg.num_clients`` virtual SuperNodes; outputs go to ``run_dir`` (with
    ``cfg.resume``: that run directory). ``client_app`` replaces fedlora's ClientApp (tests use it to
    run clients that misbehave)."""
    from flwr.simulation import run_simulation

    from fedlora.data.records import reports_shared_by_run
    from fedlora_client.app import make_client_app
    from fedlora_server.app import make_server_app

    cfg = replace(cfg, run_dir=str(cfg.resume or run_dir))
    plan = preflight(cfg)
    threads = torch.get_num_threads()
    if not os.environ.get("RAY_ADDRESS"):
        torch.set_num_threads(server_threads(cfg, local_cpus()))
    try:
        # run_simulation: no supported in-process alternative yet (see without_run_simulation_notice)
        with reports_shared_by_run(), without_run_simulation_notice():
            run_simulation(
                server_app=make_server_app(cfg, plan),
                client_app=client_app or make_client_app(cfg),
                num_supernodes=cfg.num_clients,
                backend_config=backend_config(cfg),
            )
    finally:
        torch.set_num_threads(threads)
