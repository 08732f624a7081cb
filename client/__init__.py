"""fedlora's Flower ClientApp (installed as ``fedlora_client``)."""
