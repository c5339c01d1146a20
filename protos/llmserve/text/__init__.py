"""Generated gRPC protocol code; the .proto files next to it are the source of truth."""
