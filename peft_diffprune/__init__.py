from .config import DiffPruningConfig
from .gates import deterministic_gate, hard_concrete_delta
from .model import DiffPruningModel
from .registration import register
from .serialization import install_save_hooks
from .sparse import SparsityReport, from_finetuned, project_to_sparsity, sparsity_report
from .training import expected_l0, get_tuner, param_groups


register("diff_pruning", DiffPruningConfig, DiffPruningModel)
install_save_hooks()

__all__ = [
    "DiffPruningConfig",
    "DiffPruningModel",
    "SparsityReport",
    "deterministic_gate",
    "expected_l0",
    "from_finetuned",
    "get_tuner",
    "hard_concrete_delta",
    "param_groups",
    "project_to_sparsity",
    "sparsity_report",
]
