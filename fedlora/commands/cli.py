"""The ``fedlora`` command.

    fedlora simulate [hydra overrides]      run a federation in Flower's simulation engine
                                            e.g. fedlora simulate model=tiny num_rounds=2
    fedlora simulate resume=RUN_DIR [num_rounds=N]
                                            continue a stopped run from its last checkpoint
    fedlora privacy-report RUN_DIR          write privacy_report.{json,md} and epsilon.png from a run's ledger
    fedlora compare RUN_DIR... [--out DIR] [--skip-incomplete]
                                            runs (or --multirun sweep dirs) side by side: compare.md,
                                            compare.csv, loss / metric-vs-bytes / epsilon PNGs
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

from fedlora.rundir.files import CONFIG_FILE

USAGE = __doc__


def conf_dir() -> Path:
    """``simulations/conf`` of the fedlora source tree."""
    path = Path(__file__).resolve().parents[2] / "simulations" / "conf"
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
    from fedlora.rundir.checkpoint import CheckpointError, resume_config
    from fedlora.rundir.files import RunDirError, read_config
    from fedlora.config import ConfigError, config_from_dict
    from fedlora.data.records import DataError
    from fedlora.model.loading import ModelError
    from fedlora.commands.simulate import simulate

    @hydra.main(version_base=None, config_path=str(conf_dir()), config_name="config")
    def run(dcfg: DictConfig) -> None:
        try:
            data = OmegaConf.to_container(dcfg, resolve=True)
            if data.get("resume"):  # the run's own config, with what this command line sets on top
                saved = read_config(data["resume"])
                data = resume_config(saved, data, list(HydraConfig.get().overrides.task))
            cfg = config_from_dict(data)
            simulate(cfg, HydraConfig.get().runtime.output_dir)
        except (ConfigError, DataError, AdapterError, ModelError, CheckpointError, RunDirError) as err:
            raise SystemExit(f"fedlora: error: {err}") from None

    argv = resume_argv(argv)
    multirun_check(argv)
    sys.argv = ["fedlora simulate", *argv]
    run()


def resume_argv(argv: list[str]) -> list[str]:
    """``resume=RUN_DIR``: check the directory is a run, make the path absolute, and point Hydra's
    run directory at it without letting Hydra write there (a failed resume leaves it untouched)."""
    given = [a for a in argv if a.startswith("resume=")]
    if not given or not given[-1].split("=", 1)[1]:
        return argv
    run_dir = Path(given[-1].split("=", 1)[1]).expanduser().resolve()
    if not (run_dir / CONFIG_FILE).is_file():
        raise SystemExit(f"fedlora: error: resume={run_dir}: not a fedlora run directory (no {CONFIG_FILE}); "
                         "give the directory of the run to continue")
    clash = [a for a in argv if a.startswith(("hydra.run.dir=", "-m", "--multirun"))]
    if clash:
        raise SystemExit(f"fedlora: error: resume= continues one run in its own directory; drop {' '.join(clash)}")
    rest = [a for a in argv if not a.startswith("resume=")]
    return [*rest, f"resume={run_dir}", f"hydra.run.dir={run_dir}", "hydra.output_subdir=null"]


def multirun_check(argv: list[str]) -> None:
    """Before Hydra starts: expand a ``--multirun`` sweep and check every run (zero runs is an
    error); for a single run of a config that declares a sweep, say that ``--multirun`` runs it all."""
    from fedlora.commands.sweep import MULTIRUN_FLAGS, SweepError, check_multirun, sweep_note

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
    elif command == "compare":
        from fedlora.commands.compare import compare_main

        compare_main(rest)
    elif command == "deploy":
        from fedlora.commands.deploy import deploy_main

        deploy_main(rest)
    elif command == "serve":
        from fedlora.commands.serve import serve_main

        serve_main(rest)
    else:
        raise SystemExit(f"fedlora: unknown command {command!r}\n{USAGE}")


if __name__ == "__main__":
    main()
