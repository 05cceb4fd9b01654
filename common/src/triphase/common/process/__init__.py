"""Process utilities of the long-running commands: lifetimes (lifetime), logging set-up (logs),
loopback ports (net), the workers file (endpoints_file), task lifecycle and shutdown (signals)."""
