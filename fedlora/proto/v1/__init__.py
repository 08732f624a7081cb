"""``fedlora.v1`` messages (``adapter_pb2``, ``run_pb2``, ``adapter_service_pb2``) and the
``AdapterService`` stubs (``adapter_service_pb2_grpc``). Generated; see :mod:`fedlora.proto`."""
