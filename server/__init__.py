"""fedlora's Flower ServerApp and strategy glue (installed as ``fedlora_server``)."""
