"""Training engine: the loop with hooks, optimisers and schedule, checkpoints, and the building and running of a run."""

from .build import build_model
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .hooks import BudgetHook, CheckpointHook, EvalHook, LoggerHook, MetricsLog
from .optim import WarmupCosine, build_stage1_optimizer, build_stage2_optimizer, param_groups
from .runner import train
from .trainer import HookBase, NonFiniteLossError, Stage1Trainer, Stage2Trainer, TrainerBase

__all__ = ["BudgetHook", "CheckpointError", "CheckpointHook", "EvalHook", "HookBase", "LoggerHook", "MetricsLog",
           "NonFiniteLossError", "Stage1Trainer", "Stage2Trainer", "TrainerBase", "WarmupCosine",
           "build_model", "build_stage1_optimizer", "build_stage2_optimizer", "load_checkpoint", "param_groups",
           "save_checkpoint", "train"]
