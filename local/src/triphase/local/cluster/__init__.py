"""A local Kubernetes control plane for tests and for trying the operator: binaries built from the
Go module proxy (binaries.py), started and stopped on 127.0.0.1 (controlplane.py)."""
