"""The run directory: its file names and readers, the writer of metrics and reports, checkpoints."""
