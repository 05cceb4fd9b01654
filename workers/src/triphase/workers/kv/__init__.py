"""KV connectors (NIXL, gRPC stream) that move blocks between workers, using engine/kv_layout.py."""
