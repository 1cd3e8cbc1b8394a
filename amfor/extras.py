"""Optional dependencies, imported when used: a missing one raises naming the extra that installs it.

The extras are declared in pyproject.toml: `pip install "amfor[export]"` (onnx, onnxruntime, onnxscript),
`"amfor[tensorboard]"`, `"amfor[safetensors]"`, `"amfor[search]"` (faiss-cpu).
"""

from __future__ import annotations

import importlib.util


class MissingExtraError(ImportError):
    """An optional package is not installed; the message names the extra to install."""


def require(*modules: str, extra: str, purpose: str) -> None:
    """Check that the top-level packages `modules` are installed (without importing them); MissingExtraError
    '<purpose> needs <packages> (not installed): pip install "amfor[<extra>]"' when any is not."""
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    if absent:
        raise MissingExtraError(f"{purpose} needs {' and '.join(absent)} (not installed): "
                                f'pip install "amfor[{extra}]"')
