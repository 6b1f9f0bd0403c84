#!/usr/bin/env bash
# Regenerate the gRPC modules of jaxmint-serve from open_inference.proto (checked in,
# so that installing the runtime needs no protoc). Needs grpcio-tools (in [dev]).
set -euo pipefail
cd "$(dirname "$0")/../export/src/jaxmint_runtime/serve/grpc_proto"
../../../../../.venv/bin/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. \
  open_inference.proto
# grpc_tools writes an absolute import; make it relative to this package.
sed -i 's/^import open_inference_pb2 as/from . import open_inference_pb2 as/' open_inference_pb2_grpc.py
# A pool of our own: tritonclient.grpc registers the same `inference.*` names in the
# default pool, and a process may hold both (a server and a client in one test).
sed -i 's/_descriptor_pool.Default().AddSerializedFile/_descriptor_pool.DescriptorPool().AddSerializedFile/' open_inference_pb2.py
