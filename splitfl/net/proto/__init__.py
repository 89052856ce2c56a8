"""Generated protobuf and gRPC code for ``protos/splitfl.proto`` (package ``splitfl.v1``).

Do not edit the ``splitfl_pb2*`` files by hand: change ``protos/splitfl.proto``
and run ``python -m splitfl.net.codegen`` (``tests/test_net_protos.py`` fails
when they drift apart).
"""
