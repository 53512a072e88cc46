from .activations import disable_lean_activations, enable_lean_activations, lean_activations
from .candidates import regrow_pool, select_pool
from .checkpointing import enable_checkpointing, selective_checkpointing
from .config import DiffPruningConfig
from .distributed import gather_adapter_state_dict
from .dropout import disable_threaded_dropout, enable_threaded_dropout, threaded_dropout
from .gates import deterministic_gate, hard_concrete_delta
from .model import DiffPruningModel, expected_l0, get_tuner
from .rows import shard_embedding_rows
from .sparse import SparsityReport, from_finetuned, project_to_sparsity, sparsity_report


__all__ = [
    "DiffPruningConfig",
    "DiffPruningModel",
    "SparsityReport",
    "deterministic_gate",
    "disable_lean_activations",
    "disable_threaded_dropout",
    "enable_checkpointing",
    "enable_lean_activations",
    "enable_threaded_dropout",
    "expected_l0",
    "from_finetuned",
    "gather_adapter_state_dict",
    "get_tuner",
    "hard_concrete_delta",
    "lean_activations",
    "project_to_sparsity",
    "regrow_pool",
    "select_pool",
    "selective_checkpointing",
    "shard_embedding_rows",
    "sparsity_report",
    "threaded_dropout",
]
