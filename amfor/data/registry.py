"""Dataset registry: `build_dataset(name, root, **kwargs)` and `list_datasets()`."""

from __future__ import annotations

from collections.abc import Callable

from .records import ReIDData

_DATASETS: dict[str, Callable[..., ReIDData]] = {}


def register_dataset(name: str) -> Callable[[Callable[..., ReIDData]], Callable[..., ReIDData]]:
    """Decorator registering a builder `fn(root, **kwargs) -> ReIDData` under `name`."""

    def wrap(fn: Callable[..., ReIDData]) -> Callable[..., ReIDData]:
        if name in _DATASETS:
            raise ValueError(f"dataset {name!r} is already registered")
        _DATASETS[name] = fn
        return fn

    return wrap


def _load_builtin() -> None:
    from . import datasets  # noqa: F401  (importing registers the built-in parsers)


def list_datasets() -> list[str]:
    """Registered dataset names, sorted."""
    _load_builtin()
    return sorted(_DATASETS)


def build_dataset(name: str, root: str, **kwargs) -> ReIDData:
    """Parse dataset `name` under `root` (see docs/data.md for each layout) and return its splits."""
    _load_builtin()
    key = name.lower().replace("-", "_")
    if key not in _DATASETS:
        raise KeyError(f"unknown dataset {name!r}; available: {', '.join(sorted(_DATASETS))}")
    return _DATASETS[key](root, **kwargs)
