"""Built-in dataset parsers; importing this package registers them (one file per dataset)."""

from . import (  # noqa: F401
    custom,
    dukemtmc,
    market1501,
    msmt17,
    occluded_duke,
    occluded_reid,
    p_dukemtmc,
    partial_reid,
    synthetic,
)
from .base import DatasetWarning  # noqa: F401
