"""Triton kernels for the decode step (the layer below model/), each with a PyTorch reference.

Importing this package never imports Triton: `triton_import_error()` says whether it can be
used, and the kernel modules (gemv, attention, glue) are imported only by code that has
checked. selfcheck.py decides whether the kernel path may run on this machine.
"""

from __future__ import annotations

import importlib


def triton_import_error() -> str | None:
    """None when Triton imports, else why not (the message of the failed import)."""
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception as e:  # ImportError, or a broken install raising anything else
        return f"triton does not import: {e}"
    return None
