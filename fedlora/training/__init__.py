"""What a client runs on its model: the local training loop, the loss, and evaluation."""
