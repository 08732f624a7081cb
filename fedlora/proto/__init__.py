"""Generated protobuf/gRPC code for the ``fedlora.v1`` schema in ``protos/fedlora/v1/*.proto``.

Layout: ``protos/`` is the include root, so every other language sees the canonical file names
(``fedlora/v1/adapter.proto``) and the proto package ``fedlora.v1``. protoc's Python generator turns
``fedlora/v1/x.proto`` into the module ``fedlora.v1.x_pb2`` and writes ``from fedlora.v1 import …``
for cross-file imports — which would resolve against *this* project's ``fedlora`` package, where no
``v1`` exists. :mod:`fedlora.proto.generate` therefore writes the modules to ``fedlora/proto/v1/``
and rewrites those imports (and the module names given to protobuf's builder) to
``fedlora.proto.v1``; nothing else in the generated code is touched. Do not edit the generated files;
change the ``.proto`` and run ``python -m fedlora.proto.generate``.

This ``__init__`` imports nothing, so the generator still runs when the generated code is stale.
"""
