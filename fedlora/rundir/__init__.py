"""The run directory: everything a run leaves on disk, and the code that writes and reads it.

:mod:`~fedlora.rundir.files` names every file and folder of a run directory once (``config.yaml``,
``metrics.jsonl``, ``summary.json``, ``manifest.json``, ``partition_stats.json``, ``report.md``,
``global_adapter.pb``, ``adapter/``, ``checkpoints/``, the privacy ledger and report, …) and holds
the low-level readers (config, metrics rows, summary, partition stats, the ledger's length); it
imports nothing from fedlora, so any layer may use it. :mod:`~fedlora.rundir.writer` writes a run
as it goes (config, metrics rows and the console table, summary, loss plot, manifest, report).
:mod:`~fedlora.rundir.checkpoint` saves, verifies and restores the server's per-round checkpoints
and checks that a resume is safe.
"""
