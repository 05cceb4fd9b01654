"""triphase as a Ray Serve application: `triphase.rayserve:build_app`, the import path of
deploy/ray/serve.yaml, `serve run` and a RayService's serveConfigV2 (app.py says what it deploys,
config.py what its arguments are)."""

from __future__ import annotations

from typing import Any


def build_app(args: dict[str, Any] | None = None) -> Any:
    """The application for Serve's `import_path: triphase.rayserve:build_app` and its `args:`."""
    from triphase.rayserve.app import build

    return build(args)
