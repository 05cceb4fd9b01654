"""The triphase.dev API: pydantic models (v1alpha1.py) and the CRDs rendered from them (crd.py)."""
