"""Keye toolkit: video front-end, Keye-VL / Kelix-style models, training stages, item embeddings."""

__version__ = "0.1.0"

# `import keye` stays cheap (no torch); `keye.load` imports the pipeline on first use (PEP 562).
_LAZY = {"load": "keye.api", "KeyePipeline": "keye.api", "Answer": "keye.data.answers"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'keye' has no attribute {name!r}")
