from .config import ParallelAdapterConfig
from .layer import OutputAdapter, ParallelAdapterLayer, ResidualInputAdapter
from .model import SUBLAYER_PATTERNS, ParallelAdapterModel


__all__ = [
    "SUBLAYER_PATTERNS",
    "OutputAdapter",
    "ParallelAdapterConfig",
    "ParallelAdapterLayer",
    "ParallelAdapterModel",
    "ResidualInputAdapter",
]
