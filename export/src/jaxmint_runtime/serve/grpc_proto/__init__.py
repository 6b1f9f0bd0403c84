"""Messages and stubs generated from open_inference.proto (scripts/gen_grpc.sh)."""
