from .config import DiffPruningConfig
from .gates import deterministic_gate, hard_concrete_delta
from .mam import MAMConfig, MAMModel
from .model import DiffPruningModel
from .parallel_adapter import ParallelAdapterConfig, ParallelAdapterModel
from .registration import register
from .serialization import install_save_hooks
from .sparse import SparsityReport, from_finetuned, project_to_sparsity, sparsity_report
from .training import expected_l0, get_tuner, param_groups


register("diff_pruning", DiffPruningConfig, DiffPruningModel)
register("parallel_adapter", ParallelAdapterConfig, ParallelAdapterModel)
register("mam", MAMConfig, MAMModel)
install_save_hooks()

__all__ = [
    "DiffPruningConfig",
    "DiffPruningModel",
    "MAMConfig",
    "MAMModel",
    "ParallelAdapterConfig",
    "ParallelAdapterModel",
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
