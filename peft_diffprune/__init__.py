from .config import DiffPruningConfig
from .gates import deterministic_gate, hard_concrete_delta
from .model import DiffPruningModel
from .registration import register
from .training import expected_l0, get_tuner, param_groups


register("diff_pruning", DiffPruningConfig, DiffPruningModel)

__all__ = [
    "DiffPruningConfig",
    "DiffPruningModel",
    "deterministic_gate",
    "expected_l0",
    "get_tuner",
    "hard_concrete_delta",
    "param_groups",
]
