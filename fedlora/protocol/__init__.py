"""What travels: the Flower records the apps exchange, payload compression, and the fedlora.v1 protobuf mapping."""
