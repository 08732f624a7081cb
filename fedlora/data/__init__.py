"""Data: records to prompt/response pairs to token ids, the split across clients, and each side's examples."""
