from __future__ import annotations

import re
from typing import Any

import torch
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn
from transformers import PretrainedConfig

from ..parallel_adapter.model import ParallelAdapterModel
from .config import MAMConfig
from .layer import (
    MAMLayer,
    MAMOutputAdapter,
    MAMResidualInputAdapter,
    PrefixAttention,
    PrefixTrunk,
    inner_attention_name,
    prefix_attention_name,
)


_BERT_LIKE = r"(.*\.)?layer\.\d+\.attention\.self"
_DECODER_LIKE = r"(.*\.)?layers\.\d+\.self_attn"

#: Self-attention modules per `model_type`, as full-match regexes.
ATTENTION_PATTERNS: dict[str, str] = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "camembert", "electra"), _BERT_LIKE),
    "gpt2": r"(.*\.)?h\.\d+\.attn",
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"), _DECODER_LIKE),
    "vit": r"(.*\.)?layers\.\d+\.attention",
    "t5": r"(.*\.)?block\.\d+\.layer\.0\.SelfAttention",
}


def _matches(patterns: str | set[str], key: str) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, key) is not None
    return any(key == name or key.endswith(f".{name}") for name in patterns)


def _model_configs(model: nn.Module) -> list[PretrainedConfig]:
    """Every distinct transformers config in the model: encoder-decoders (T5) give their stacks copies."""
    configs = {
        id(m.config): m.config for m in model.modules() if isinstance(getattr(m, "config", None), PretrainedConfig)
    }
    return list(configs.values())


def _kv_dim(model_config: Any) -> int:
    """Width of one layer's keys (and values): key/value heads x head size."""
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or getattr(model_config, "d_kv", None)
    return kv_heads * (head_dim or model_config.hidden_size // heads)


class MAMModel(ParallelAdapterModel):
    """The MAM adapter (He et al., ICLR 2022) as a PEFT tuner: prefix tuning on every self-attention layer and a scaled
    parallel adapter on every feed-forward block.

    The prefixes enter through transformers' attention interface: the model's `config._attn_implementation` becomes
    `mam_prefix_<implementation>` while the adapter is injected, and is restored by `unload()`.

    Args:
        model ([`~transformers.PreTrainedModel`]): The model to adapt.
        config ([`MAMConfig`]): The adapter configuration.
        adapter_name (`str`): The adapter name, `"default"` by default.
        low_cpu_mem_usage (`bool`, *optional*): Accepted for PEFT's interface; adapters are small and built in place.

    Example:

        ```py
        >>> import peft_diffprune  # registers the method with PEFT
        >>> from peft import get_peft_model
        >>> from transformers import AutoModelForSequenceClassification
        >>> from peft_diffprune import MAMConfig

        >>> base = AutoModelForSequenceClassification.from_pretrained("roberta-base", num_labels=2)
        >>> model = get_peft_model(base, MAMConfig(task_type="SEQ_CLS", prefix_length=16, r=16, scaling=2.0))
        ```
    """

    prefix: str = "mam_"
    tuner_layer_cls = MAMLayer
    method_name = "MAMConfig"
    output_layer_cls = MAMOutputAdapter
    residual_layer_cls = MAMResidualInputAdapter

    def _prepare_adapter_config(self, peft_config: MAMConfig, model_config: dict) -> MAMConfig:
        model_type = model_config.get("model_type")
        if peft_config.prefix_modules is None:
            if model_type not in ATTENTION_PATTERNS:
                raise ValueError(
                    f"MAMConfig does not know where the self-attention modules of model_type={model_type!r} are. "
                    f"Supported: {sorted(ATTENTION_PATTERNS)}. For another architecture pass `prefix_modules` (its "
                    "self-attention modules) and `target_modules` (its feed-forward blocks)."
                )
            peft_config.prefix_modules = ATTENTION_PATTERNS[model_type]
        return super()._prepare_adapter_config(peft_config, model_config)

    def _prepare_model(self, peft_config: MAMConfig, model: nn.Module) -> None:
        configs = _model_configs(model)
        if not configs:
            raise ValueError(
                "The MAM adapter needs a transformers model: its prefixes go through transformers' attention interface."
            )
        for config in configs:
            config._attn_implementation = prefix_attention_name(config._attn_implementation or "eager")
        if not hasattr(self, "mam_prefix_trunk"):
            self.mam_prefix_trunk = nn.ModuleDict()
            self.register_load_state_dict_post_hook(self._drop_unused_trunks)

    @staticmethod
    def _check_target_module_exists(peft_config: MAMConfig, key: str) -> bool:
        return _matches(peft_config.prefix_modules, key) or bool(check_target_module_exists(peft_config, key))

    def _create_and_replace(
        self,
        peft_config: MAMConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        if not _matches(peft_config.prefix_modules, current_key):
            return super()._create_and_replace(
                peft_config, adapter_name, target, target_name, parent, current_key, **kwargs
            )
        trunk = self._trunk(peft_config, adapter_name)
        if isinstance(target, PrefixAttention):
            target.update_layer(adapter_name, peft_config, trunk)
            return
        new_module = PrefixAttention(target, adapter_name, peft_config, _kv_dim(self.model.config), trunk)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _trunk(self, peft_config: MAMConfig, adapter_name: str) -> PrefixTrunk | None:
        """The adapter's shared reparameterisation trunk, created on first use; None without projection."""
        if not peft_config.prefix_projection or peft_config.inference_mode:
            return None
        if adapter_name not in self.mam_prefix_trunk:
            reference = next(self.model.parameters())
            self.mam_prefix_trunk[adapter_name] = PrefixTrunk(
                peft_config.prefix_length,
                self.model.config.hidden_size,
                peft_config.prefix_hidden_size,
                device=reference.device,
                dtype=reference.dtype,
            )
        return self.mam_prefix_trunk[adapter_name]

    def _drop_unused_trunks(self, module: nn.Module, incompatible_keys: Any) -> None:
        # loading folded prefixes drops the layers' projection heads (PrefixAttention._drop_projection_on_load);
        # their trunks go too, and are not "missing" from a checkpoint that never holds them
        used = {name for layer in self.prefix_layers().values() for name in layer.mam_prefix_head}
        for name in [name for name in self.mam_prefix_trunk if name not in used]:
            del self.mam_prefix_trunk[name]
            marker = f"mam_prefix_trunk.{name}."
            incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if marker not in k]

    def prefix_layers(self) -> dict[str, PrefixAttention]:
        return {name: m for name, m in self.model.named_modules() if isinstance(m, PrefixAttention)}

    def fold_prefixes(self, adapter_name: str | None = None) -> None:
        """Replace the prefix reparameterisation of an adapter (all adapters by default) by the plain prefixes it
        currently produces, as the paper does after training. Saving does this on the fly without changing the
        model."""
        names = [adapter_name] if adapter_name else list(self.mam_prefix_trunk)
        for layer in self.prefix_layers().values():
            for name in names:
                layer.fold(name)
        for name in names:
            if name in self.mam_prefix_trunk:
                del self.mam_prefix_trunk[name]

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        state_dict = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        # save plain prefixes: the reparameterisation is a training device (He et al., Li and Liang)
        state_dict = {
            key: value
            for key, value in state_dict.items()
            if ".mam_prefix_head." not in key and ".mam_prefix_trunk." not in key
        }
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, PrefixAttention) and adapter_name in module.mam_prefix_head:
                    key, value = module.prefixes(adapter_name)
                    state_dict[f"{name}.mam_prefix_key.{adapter_name}"] = key.detach().clone()
                    state_dict[f"{name}.mam_prefix_value.{adapter_name}"] = value.detach().clone()
        return state_dict

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name in self.mam_prefix_trunk:
            del self.mam_prefix_trunk[adapter_name]

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> nn.Module:
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        for config in _model_configs(model):
            config._attn_implementation = inner_attention_name(config._attn_implementation)
        return model
