"""Who may call which WorkerService method: the identity in the caller's certificate (common/security/pki.py).

Every certificate the deployment's CA signed belongs to the deployment; its identity says which part
it is. The router places requests and balances decode streams; the control loop (the operator or the
local one) switches roles and drains; workers read each other's KV and embeddings and release KV they
took over (the router releases KV of hand-offs that failed). Health checking is a separate service on
its own plaintext port (probes carry no certificate) and says nothing but SERVING or NOT_SERVING.
Without mTLS (no bundle) there is no identity and nothing is authorised: a plaintext stack on one
machine, where whoever reaches the port is already on it.
"""

from __future__ import annotations

from triphase.common.security.pki import Identity

ROUTER, WORKER, CONTROL = Identity.ROUTER, Identity.WORKER, Identity.CONTROL

CALLERS: dict[str, frozenset[Identity]] = {
    "Prefill": frozenset({ROUTER}),
    "Decode": frozenset({ROUTER}),
    "Generate": frozenset({ROUTER}),
    "Session": frozenset({ROUTER}),
    "Encode": frozenset({ROUTER}),
    "WatchStats": frozenset({ROUTER, CONTROL}),
    "HandOver": frozenset({ROUTER, CONTROL}),
    "SetRole": frozenset({CONTROL}),
    "Drain": frozenset({CONTROL}),
    "ReadKv": frozenset({WORKER}),
    "ReleaseKv": frozenset({WORKER, ROUTER}),
    "ReadEmbeddings": frozenset({WORKER}),
}


def refusal(method: str, identity: str) -> str | None:
    """Why `identity` may not call `method` (None: it may). A method missing from CALLERS is refused."""
    allowed = CALLERS.get(method, frozenset())
    if identity in {i.value for i in allowed}:
        return None
    who = ", ".join(sorted(i.value for i in allowed)) or "nobody"
    return f"{method} is for {who}; the caller's certificate says {identity!r}"
