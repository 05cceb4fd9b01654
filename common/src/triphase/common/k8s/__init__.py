"""Kubernetes, shared by the router's discovery and the operator: API credentials (client) and
reading worker pods (pods)."""
