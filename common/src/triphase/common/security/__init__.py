"""Who may talk to whom: mutual TLS bundles and channels (mtls), the deployment's CA and
certificates (pki), signed KV tickets (tickets)."""
