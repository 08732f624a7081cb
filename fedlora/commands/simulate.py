"""Run a federation in Flower's simulation engine on this machine."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from fedlora.config import FedloraConfig, config_to_dict
from fedlora.data.partition import partition_dataset
from fedlora.data.splits import load_splits


def preflight(cfg: FedloraConfig) -> None:
    """Fail on bad strategy, data, partitioning or checkpoint before the simulation engine starts."""
    from fedlora.aggregation import resolve_method

    resolve_method(cfg)
    if cfg.resume:  # corrupt or incompatible: refused here, with the run directory untouched
        from fedlora.rundir.checkpoint import prepare_resume

        ckpt = prepare_resume(cfg.resume, config_to_dict(cfg))
        print(f"fedlora: resuming {cfg.resume} after round {ckpt.round} of {cfg.num_rounds}", flush=True)
    if cfg.dp.mode == "client":
        from fedlora.privacy import check_client_level_strategy

        check_client_level_strategy(cfg.strategy.name)
    train, _ = load_splits(cfg)
    partition_dataset(train, cfg.dataset, cfg.num_clients)


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


def simulate(cfg: FedloraConfig, run_dir: str | Path, client_app=None) -> None:
    """Run ``cfg`` with ``cfg.num_clients`` virtual SuperNodes; outputs go to ``run_dir`` (with
    ``cfg.resume``: that run directory). ``client_app`` replaces fedlora's ClientApp (tests use it to
    run clients that misbehave)."""
    from flwr.simulation import run_simulation

    from fedlora_client.app import make_client_app
    from fedlora_server.app import make_server_app

    cfg = replace(cfg, run_dir=str(cfg.resume or run_dir))
    preflight(cfg)
    threads = torch.get_num_threads()
    if not os.environ.get("RAY_ADDRESS"):
        torch.set_num_threads(server_threads(cfg, local_cpus()))
    try:
        run_simulation(
            server_app=make_server_app(cfg),
            client_app=client_app or make_client_app(cfg),
            num_supernodes=cfg.num_clients,
            backend_config=backend_config(cfg),
        )
    finally:
        torch.set_num_threads(threads)
