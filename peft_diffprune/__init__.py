from .diff_pruning import (
    DiffPruningConfig,
    DiffPruningModel,
    SparsityReport,
    deterministic_gate,
    disable_lean_activations,
    disable_threaded_dropout,
    enable_checkpointing,
    enable_lean_activations,
    enable_threaded_dropout,
    expected_l0,
    from_finetuned,
    gather_adapter_state_dict,
    get_tuner,
    hard_concrete_delta,
    lean_activations,
    project_to_sparsity,
    regrow_pool,
    select_pool,
    selective_checkpointing,
    shard_embedding_rows,
    sparsity_report,
    threaded_dropout,
)
from .mam import MAMConfig, MAMModel
from .parallel_adapter import ParallelAdapterConfig, ParallelAdapterModel
from .recipe import (
    DiffPruningSchedule,
    DiffPruningTrainer,
    DiffPruningTrainerMixin,
    LossTerms,
    checkpoint_stage,
    clip_grad_norm_per_group,
    param_groups,
    stage_scheduler,
)
from .registration import register
from .serialization import install_hooks


register("diff_pruning", DiffPruningConfig, DiffPruningModel)
register("parallel_adapter", ParallelAdapterConfig, ParallelAdapterModel)
register("mam", MAMConfig, MAMModel)
install_hooks()

__all__ = [
    "DiffPruningConfig",
    "DiffPruningModel",
    "DiffPruningSchedule",
    "DiffPruningTrainer",
    "DiffPruningTrainerMixin",
    "LossTerms",
    "MAMConfig",
    "MAMModel",
    "ParallelAdapterConfig",
    "ParallelAdapterModel",
    "SparsityReport",
    "checkpoint_stage",
    "clip_grad_norm_per_group",
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
    "param_groups",
    "project_to_sparsity",
    "regrow_pool",
    "select_pool",
    "selective_checkpointing",
    "shard_embedding_rows",
    "sparsity_report",
    "stage_scheduler",
    "threaded_dropout",
]
