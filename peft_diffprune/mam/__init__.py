from .config import MAMConfig
from .layer import PrefixAttention, prefix_attention
from .model import ATTENTION_PATTERNS, MAMModel


__all__ = ["ATTENTION_PATTERNS", "MAMConfig", "MAMModel", "PrefixAttention", "prefix_attention"]
