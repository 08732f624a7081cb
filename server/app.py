"""fedlora's Flower ServerApp: parse the config, run the round loop.

``app`` is what ``flwr run .`` loads (config from Flower's run config); ``make_server_app(cfg)``
is what ``fedlora simulate`` uses (config from Hydra). Both reach the same ``run_server``.
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora.config import FedloraConfig, config_from_run_config
from fedlora.plan import RunPlan
from fedlora_server.loop import run_server


def default_run_dir() -> str:
    return str(Path("runs") / time.strftime("%Y-%m-%d_%H-%M-%S"))


def make_server_app(cfg: FedloraConfig | None = None, plan: RunPlan | None = None) -> ServerApp:
    """A ServerApp bound to ``cfg``, or reading Flower's run config when ``cfg`` is None; ``plan``
    is ``cfg``'s checked inputs when the caller already built them (:func:`fedlora.plan.plan_run`)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg if cfg is not None else config_from_run_config(dict(context.run_config))
        run_server(grid, run_cfg, run_cfg.run_dir or default_run_dir(), plan if cfg is not None else None)

    return server_app


app = make_server_app()
