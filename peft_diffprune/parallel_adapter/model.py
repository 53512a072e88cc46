from __future__ import annotations

from typing import Any

from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .config import ParallelAdapterConfig
from .layer import OutputAdapter, ParallelAdapterLayer, ResidualInputAdapter, takes_residual_input


_BERT_LIKE = {"ffn": r"(.*\.)?layer\.\d+\.output", "attn": r"(.*\.)?layer\.\d+\.attention\.output"}
_DECODER_LIKE = {"ffn": r"(.*\.)?layers\.\d+\.mlp", "attn": r"(.*\.)?layers\.\d+\.self_attn"}

#: Sub-layer modules per `model_type`, as full-match regexes. BERT-like encoders are post-LN: their output modules
#: see the sub-layer input as `input_tensor`. The others are pre-LN: the wrapped module reads the normalised input.
SUBLAYER_PATTERNS: dict[str, dict[str, str]] = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "camembert", "electra"), _BERT_LIKE),
    "gpt2": {"ffn": r"(.*\.)?h\.\d+\.mlp", "attn": r"(.*\.)?h\.\d+\.attn"},
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"), _DECODER_LIKE),
    "vit": {"ffn": r"(.*\.)?layers\.\d+\.mlp", "attn": r"(.*\.)?layers\.\d+\.attention"},
    "t5": {"ffn": r"(.*\.)?layer\.\d+\.DenseReluDense", "attn": r"(.*\.)?block\.\d+\.layer\.0\.SelfAttention"},
}


def sublayer_regex(model_type: str | None, placement: list[str], method: str) -> str:
    """One full-match regex for the sub-layers named by `placement` in a model of `model_type`."""
    patterns = SUBLAYER_PATTERNS.get(model_type or "")
    if patterns is None:
        raise ValueError(
            f"{method} does not know where the sub-layers of model_type={model_type!r} are. Supported: "
            f"{sorted(SUBLAYER_PATTERNS)}. For another architecture pass `target_modules` naming its feed-forward "
            "(and/or attention) modules: each must take the sub-layer input as first argument and return the "
            "sub-layer output, or be a BERT-style `forward(hidden_states, input_tensor)` output module."
        )
    return "|".join(f"(?:{patterns[p]})" for p in placement)


class ParallelAdapterModel(BaseTuner):
    """Scaled parallel adapters (He et al., ICLR 2022) as a PEFT tuner.

    Each targeted sub-layer (the FFN block and/or the attention block of every transformer layer) gets a bottleneck
    `act(x W_down) W_up` reading the sub-layer's input, whose output times `s` is added to the sub-layer's output
    before the residual connection.

    Args:
        model ([`~transformers.PreTrainedModel`]): The model to adapt.
        config ([`ParallelAdapterConfig`]): The adapter configuration.
        adapter_name (`str`): The adapter name, `"default"` by default.
        low_cpu_mem_usage (`bool`, *optional*): Accepted for PEFT's interface; adapters are small and built in place.

    Example:

        ```py
        >>> import peft_diffprune  # registers the method with PEFT
        >>> from peft import get_peft_model
        >>> from transformers import AutoModelForSequenceClassification
        >>> from peft_diffprune import ParallelAdapterConfig

        >>> base = AutoModelForSequenceClassification.from_pretrained("roberta-base", num_labels=2)
        >>> config = ParallelAdapterConfig(task_type="SEQ_CLS", r=16, scaling=2.0, placement=["ffn"])
        >>> model = get_peft_model(base, config)
        ```
    """

    prefix: str = "parallel_adapter_"
    tuner_layer_cls = ParallelAdapterLayer
    target_module_mapping: dict[str, list[str]] = {}
    method_name = "ParallelAdapterConfig"
    output_layer_cls: type[nn.Module] = OutputAdapter
    residual_layer_cls: type[nn.Module] = ResidualInputAdapter

    def _prepare_adapter_config(self, peft_config: ParallelAdapterConfig, model_config: dict) -> ParallelAdapterConfig:
        if peft_config.target_modules is None:
            peft_config.target_modules = sublayer_regex(
                model_config.get("model_type"), peft_config.placement, self.method_name
            )
        return peft_config

    def _create_and_replace(
        self,
        peft_config: ParallelAdapterConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, peft_config)
            return
        if isinstance(target, nn.Linear) and target.in_features != target.out_features:
            raise ValueError(
                f"Target module {current_key!r} is a Linear {target.in_features} -> {target.out_features}; a parallel "
                "adapter sits beside a whole sub-layer that maps the hidden state to the same width (a block's `mlp` "
                "or `attention.output`). Point `target_modules` at the sub-layer module instead."
            )
        layer_cls = self.residual_layer_cls if takes_residual_input(target) else self.output_layer_cls
        new_module = layer_cls(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # BaseTuner's version copies `child.weight` and moves things around for single-weight layers; the wrapped
        # sub-layers are whole blocks (adapters are created on their device), so a plain swap is all there is.
        setattr(parent, child_name, new_module)

    def _check_merge_allowed(self) -> None:
        raise ValueError(
            f"{type(self).__name__} cannot merge: its adapters are non-linear modules beside the sub-layers, not weight "
            "deltas. Use `unload()` to get the base model back, or keep the adapted model as it is."
        )
