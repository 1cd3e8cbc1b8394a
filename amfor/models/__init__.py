"""The AMFOR model: one file per component (backbone, text, fusion, parts, reconstruction, heads), the model that
composes them (amfor.py) and the registry of variants (registry.py)."""

from amfor.models.amfor import AMFOR, LOSS_WEIGHTS, SWITCHES
from amfor.models.backbone import ReIDViT, checkpoint_filter_fn, load_state_dict_file
from amfor.models.registry import create_model, list_models, register_model

__all__ = ["AMFOR", "LOSS_WEIGHTS", "SWITCHES", "ReIDViT", "checkpoint_filter_fn", "create_model", "list_models",
           "load_state_dict_file", "register_model"]
