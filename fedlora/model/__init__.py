"""The frozen base model: loading it from wherever the config points, the tiny test model, building the adapted model, PEFT export."""
