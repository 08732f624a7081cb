"""The ``fedlora`` command.

    fedlora simulate [hydra overrides]      run a federation in Flower's simulation engine
                                            e.g. fedlora simulate model=tiny num_rounds=2
    fedlora privacy-report RUN_DIR          write privacy_report.{json,md} and epsilon.png from a run's ledger
    fedlora deploy certs OUT_DIR --host H [--host H …] [--node NAME …]
                                            CA, SuperLink TLS certificate, SuperNode auth keys
    fedlora deploy federation NAME --address HOST:PORT (--root-certificates CA | --insecure) [--default]
    fedlora deploy check-node 'partition-id=0 num-partitions=3 lora-rank=8' [--app DIR] [--run-config '…']
    fedlora serve RUN_DIR [NAME=RUN_DIR …] [--host 127.0.0.1] [--port 50061]
                  [--tls-cert C --tls-key K [--tls-client-ca CA]]
                                            serve adapters, metrics and privacy reports over gRPC
"""

from __future__ import annotations

import sys
from pathlib import Path

USAGE = __doc__


def conf_dir() -> Path:
    """``simulations/conf`` of the fedlora source tree."""
    path = Path(__file__).resolve().parents[1] / "simulations" / "conf"
    if not path.is_dir():
        raise SystemExit(
            f"fedlora: Hydra configs not found at {path}; install fedlora from its source tree "
            "(pip install -e .) so simulations/conf is available"
        )
    return path


def simulate_main(argv: list[str]) -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig, OmegaConf

    from fedlora.adapters import AdapterError
    from fedlora.config import ConfigError, config_from_dict
    from fedlora.data import DataError
    from fedlora.models import ModelError
    from fedlora.simulation import simulate

    @hydra.main(version_base=None, config_path=str(conf_dir()), config_name="config")
    def run(dcfg: DictConfig) -> None:
        try:
            cfg = config_from_dict(OmegaConf.to_container(dcfg, resolve=True))
            simulate(cfg, HydraConfig.get().runtime.output_dir)
        except (ConfigError, DataError, AdapterError, ModelError) as err:
            raise SystemExit(f"fedlora: error: {err}") from None

    multirun_check(argv)
    sys.argv = ["fedlora simulate", *argv]
    run()


def multirun_check(argv: list[str]) -> None:
    """Before Hydra starts: expand a ``--multirun`` sweep and check every run (zero runs is an
    error); for a single run of a config that declares a sweep, say that ``--multirun`` runs it all."""
    from fedlora.sweep import MULTIRUN_FLAGS, SweepError, check_multirun, sweep_note

    flags = [a for a in argv if a.startswith("-")]
    if any(f not in MULTIRUN_FLAGS for f in flags):  # --cfg, --info, --config-dir …: Hydra's business
        return
    if not flags:
        note = sweep_note(conf_dir(), "config", argv)
        if note:
            print(note, flush=True)
        return
    try:
        runs = check_multirun(conf_dir(), "config", argv)
    except SweepError as err:
        raise SystemExit(f"fedlora: error: {err}") from None
    print(f"fedlora: the sweep has {runs} run(s); every one checked", flush=True)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command == "simulate":
        simulate_main(rest)
    elif command == "privacy-report":
        from fedlora.privacy import privacy_report_main

        if len(rest) != 1:
            raise SystemExit(f"fedlora: privacy-report takes one RUN_DIR\n{USAGE}")
        privacy_report_main(rest[0])
    elif command == "deploy":
        from fedlora.deploy import deploy_main

        deploy_main(rest)
    elif command == "serve":
        from fedlora.adapter_service import serve_main

        serve_main(rest)
    else:
        raise SystemExit(f"fedlora: unknown command {command!r}\n{USAGE}")


if __name__ == "__main__":
    main()
