from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn
from torch.distributed.tensor import DTensor

from .config import DiffPruningConfig
from .distributed import is_fsdp1_parameter, local_part, shard_group, sharded_weighted_l0
from .fingerprint import fingerprint_matches
from .gates import L0Weights, tensor_penalty
from .layer import (
    DiffPruningLayer,
    DiffState,
    Embedding,
    GenericLayer,
    PenaltyTerms,
    close_penalty_terms,
    is_supported_module,
    open_penalty_terms,
)


def tied_parameters(model: nn.Module) -> dict[int, list[tuple[str, str]]]:
    """Parameters that several modules share (e.g. an LM head tied to the input embedding), by id: every
    `(module name, parameter name)` using one, in module order. Wrapped modules count under their own name."""
    owners = defaultdict(list)
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module._parameters.items():
            name = module_name.removesuffix(".base_layer") if isinstance(param, nn.Parameter) else None
            if name is not None and (name, param_name) not in owners[id(param)]:
                owners[id(param)].append((name, param_name))
    return {param_id: users for param_id, users in owners.items() if len({name for name, _ in users}) > 1}


def _in_modules_to_save(peft_config: DiffPruningConfig, module_name: str) -> bool:
    """Whether `module_name` is matched by `modules_to_save`, as PEFT matches it."""
    return any(re.match(rf"(^|.*\.){m}($|\..*)", module_name) for m in peft_config.modules_to_save or ())


def _has_parameter(model: nn.Module, key: str) -> bool:
    module_name, _, param_name = key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return False
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    return isinstance(getattr(module, param_name, None), torch.Tensor)


def _state_penalty(state: DiffState, weights: L0Weights, recorded: PenaltyTerms | None = None) -> torch.Tensor:
    """The expected-L0 penalty of one adapter's gated tensors on one module (see [`~gates.tensor_penalty`]).

    Tensors whose layer recorded a penalty in the forward being run (`recorded`) use that term, the others get
    their own autograd node.
    """
    total = torch.zeros((), dtype=torch.float32)
    for name in state.tensor_names:
        if state.is_sparse(name):
            continue
        term = None if recorded is None else recorded.terms.get((id(state), name))
        if term is None:
            if state.is_sharded():
                raise RuntimeError(
                    f"The gates of {state.module_name}.{name} were not sampled in this forward, so their penalty "
                    "would be computed outside the module's forward, where FSDP has sharded them. Call every "
                    "wrapped module in forward, or exclude it from target_modules."
                )
            alpha, group_alpha = getattr(state, f"{name}_alpha"), getattr(state, f"{name}_group_alpha", None)
            term = tensor_penalty(alpha, state.stretch, weights, group_alpha)
        total = total.to(term.device) + term
    return total


class DiffPruningModel(BaseTuner):
    """Diff pruning (Guo, Rush and Kim, ACL 2021) as a PEFT tuner.

    Every targeted module's parameters are used as `theta + z * w`, with a dense diff `w` (initialised at zero) and
    hard-concrete gates `z` with logits `alpha`. In training mode the expected-L0 penalty `l0_lambda * E[L0]` is added
    to the loss the base model returns. After [`project_to_sparsity`] each layer holds only the kept entries.

    Args:
        model ([`~transformers.PreTrainedModel`]): The model to adapt.
        config ([`DiffPruningConfig`]): The diff pruning configuration.
        adapter_name (`str`): The adapter name, `"default"` by default.
        low_cpu_mem_usage (`bool`, *optional*): Create empty adapter weights on the meta device (faster loading).

    Example:

        ```py
        >>> import peft_diffprune  # registers the method with PEFT
        >>> from peft import get_peft_model
        >>> from transformers import AutoModelForSequenceClassification
        >>> from peft_diffprune import DiffPruningConfig, param_groups

        >>> base = AutoModelForSequenceClassification.from_pretrained("bert-base-uncased", num_labels=2)
        >>> model = get_peft_model(base, DiffPruningConfig(task_type="SEQ_CLS"))
        >>> optimizer = torch.optim.AdamW(param_groups(model, lr=1e-5, alpha_lr=0.1))
        >>> loss = model(**batch).loss  # task loss + l0_lambda * expected L0
        ```
    """

    prefix: str = "diff_pruning_"
    tuner_layer_cls = DiffPruningLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: DiffPruningConfig, model_config: dict) -> DiffPruningConfig:
        # `target_modules=None` means "every supported module"; it is resolved against the model in `_prepare_model`.
        return peft_config

    def _prepare_model(self, peft_config: DiffPruningConfig, model: nn.Module) -> None:
        self._tied = tied_parameters(model)
        if peft_config.target_modules is None:
            peft_config.target_modules = self._default_target_modules(model)
        if peft_config.kept_pattern and peft_config.base_fingerprint and peft_config.verify_base_fingerprint:
            self._verify_base(peft_config)

    def _verify_base(self, peft_config: DiffPruningConfig) -> None:
        """Refuse a sparse adapter made on other base weights: its positions and values would be meaningless."""
        missing = [key for key in peft_config.kept_pattern if not _has_parameter(self.model, key)]
        if missing:
            raise ValueError(
                f"This diff pruning adapter changes {missing[0]!r} (and {len(missing) - 1} more), which the base model "
                f"{type(self.model).__name__} does not have: load it onto the model it was trained on "
                f"({peft_config.base_model_name_or_path or 'see adapter_config.json'})."
            )
        if not fingerprint_matches(self, list(peft_config.kept_pattern), peft_config.base_fingerprint):
            raise ValueError(
                "The base model's weights differ from those this diff pruning adapter was made on (their base "
                "fingerprints differ), so its sparse diff would be applied to the wrong weights. Load the adapter onto "
                f"{peft_config.base_model_name_or_path or 'its base model'}, unmerge other adapters first, or, if you "
                "are sure, load with a config whose verify_base_fingerprint=False: config = "
                "PeftConfig.from_pretrained(path); config.verify_base_fingerprint = False; "
                "PeftModel.from_pretrained(model, path, config=config)."
            )

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        if any(isinstance(value, DTensor) for value in state_dict.values()):
            raise ValueError(
                "This model is sharded with FSDP2, so its state dict holds shards: pass the gathered adapter state, "
                "on every rank: get_peft_model_state_dict(model, state_dict=gather_adapter_state_dict(model)), or "
                "model.save_pretrained(path, state_dict=gather_adapter_state_dict(model), is_main_process=rank == 0)."
            )
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        # PEFT finds the tuner layers by module name and strips FSDP1's `_fsdp_wrapped_module.` only at the start of
        # it, so under nested FSDP1 units (one per transformer block) it missed every layer inside them; the state
        # dict FSDP1 returns has clean keys, and all of diff pruning's live under `.diff_pruning_state.`
        selected.update(
            {
                key: value
                for key, value in state_dict.items()
                if ".diff_pruning_state." in key
                and not any(k in key for k in (".modules_to_save.", ".original_module."))
            }
        )
        # sparse values are trained in fp32 and saved in the dtype the config asks for
        state_dict = selected
        values_dtype = getattr(torch, config.values_dtype)
        return {
            key: value.to(values_dtype) if key.endswith("_values") and ".diff_pruning_state." in key else value
            for key, value in state_dict.items()
        }

    def _default_target_modules(self, model: nn.Module) -> set[str]:
        tuner_layers = {name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}
        targets = set()
        for name, module in model.named_modules():
            if not name or any(name.startswith(f"{layer}.") for layer in tuner_layers):
                continue
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if not is_supported_module(base):
                continue
            if not all(self._can_share(users) for users in self._tied_users(base)):
                continue
            targets.add(name)
        if not targets:
            raise ValueError(
                f"{type(model).__name__} has no module diff pruning can wrap (nn.Linear, nn.Embedding, nn.Conv2d, "
                "Conv1D, LayerNorm or RMSNorm); pass `target_modules` naming the modules to adapt."
            )
        return targets

    def _create_and_replace(
        self,
        peft_config: DiffPruningConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        if isinstance(target, DiffPruningLayer):
            target.update_layer(
                adapter_name, peft_config, current_key, self._shared_diff(peft_config, target, current_key)
            )
            return
        if not is_supported_module(target):
            raise TypeError(
                f"Target module {current_key!r} is a {type(target).__name__}, which diff pruning does not support. "
                "Supported: nn.Linear, nn.Embedding, nn.Conv2d, transformers' Conv1D, nn.LayerNorm and RMS-norm "
                "layers. Remove it from `target_modules` or add it to `exclude_modules`."
            )
        shared_diff = self._shared_diff(peft_config, target, current_key)
        owner, shared_names = shared_diff
        kept_here = any(k.startswith(f"{current_key}.") for k in peft_config.kept_pattern)
        # the owner comes first in module order: its state of this adapter is already built
        owner_state = (
            owner.diff_pruning_state[adapter_name] if owner and adapter_name in owner.diff_pruning_state else None
        )
        owner_keeps = owner_state is not None and not shared_names.isdisjoint(owner_state.tensor_names)
        if peft_config.kept_pattern and not kept_here and not owner_keeps:
            # a sparse adapter keeps no entry of this module (nor of a tied weight it shares): leave it unwrapped
            return
        layer_cls = Embedding if isinstance(target, nn.Embedding) else GenericLayer
        new_module = layer_cls(target, adapter_name, peft_config, module_name=current_key, shared_diff=shared_diff)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _check_tied_modules(self, model: nn.Module, peft_config: DiffPruningConfig) -> None:
        # PEFT warns that tied layers in an adapter "can lead to complications": here they share one diff
        pass

    def _get_tied_target_modules(self, model: nn.Module) -> list[str]:
        # read by PEFT's merge check, which warns about tied targets: their one shared diff is merged once
        return []

    def _tied_users(self, module: nn.Module) -> list[list[tuple[str, str]]]:
        """For each parameter of `module` tied to another module's: every `(module name, parameter name)` using it."""
        if isinstance(module, BaseTunerLayer):
            module = module.get_base_layer()
        tied = getattr(self, "_tied", {})
        return [tied[id(param)] for param in module._parameters.values() if param is not None and id(param) in tied]

    def _can_share(self, users: list[tuple[str, str]]) -> bool:
        """Whether one diff can serve every module using a tied parameter: supported modules, same parameter name."""
        if len({param_name for _, param_name in users}) > 1:
            return False
        modules = [self.model.get_submodule(name) for name, _ in users]
        return all(is_supported_module(m.get_base_layer() if isinstance(m, BaseTunerLayer) else m) for m in modules)

    def _shared_diff(
        self, peft_config: DiffPruningConfig, target: nn.Module, current_key: str
    ) -> tuple[DiffPruningLayer | None, frozenset[str]]:
        """`(owner, names)` for the parameters of `target` tied to an earlier module's: that module (the first user
        in module order) holds the one diff of them, which applies to every user. Every user must be targeted."""
        owner, names = None, set()
        for users in self._tied_users(target):
            # a module in `modules_to_save` trains a copy of its own: it no longer uses the tied weight
            users = [(name, param) for name, param in users if not _in_modules_to_save(peft_config, name)]
            others = [name for name, _ in users if name != current_key]
            if not others:
                continue
            if not self._can_share(users):
                raise ValueError(
                    f"Target module {current_key!r} shares a weight with {others} (tied weights) in a way one diff "
                    "cannot serve (another parameter name or an unsupported module). Untie the weights first (e.g. "
                    "load the model with tie_word_embeddings=False) or add it to `exclude_modules`."
                )
            untargeted = [name for name in others if not self._check_target_module_exists(peft_config, name)]
            if untargeted:
                raise ValueError(
                    f"Target module {current_key!r} shares its weight with {untargeted} (tied weights): one diff "
                    f"serves every module using the weight, so target them all (add {untargeted} to "
                    "`target_modules`) or none (add them to `exclude_modules`)."
                )
            first_name, param_name = users[0]
            if first_name != current_key:
                candidate = self.model.get_submodule(first_name)
                owner = candidate if isinstance(candidate, DiffPruningLayer) else None
                names.add(param_name)
        return owner, frozenset(names)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # Diff states are created on the base layer's device; BaseTuner's version would also copy `child.weight`
        # onto unwrapped modules, which fails for task heads without a weight (RobertaClassificationHead).
        setattr(parent, child_name, new_module)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """PEFT's `merge_adapter`, without its per-layer offload check when no module has an Accelerate hook.

        PEFT enters `onload_layer` around every wrapped module, which walks the module's submodules for offload
        hooks; with 53 wrapped modules on MiniLM that took about a third of a merged task switch. One walk of the
        model decides instead, and a model with Accelerate hooks (device map, offload) takes PEFT's path.
        """
        layers = self._layers_unless_hooked()
        if layers is None:
            return super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)
        self._check_merge_allowed()
        for layer in layers:
            layer.merge(adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        """PEFT's `unmerge_adapter`, with the fast path of `merge_adapter`."""
        layers = self._layers_unless_hooked()
        if layers is None:
            return super().unmerge_adapter()
        for layer in layers:
            layer.unmerge()

    def _layers_unless_hooked(self) -> list[DiffPruningLayer] | None:
        """The wrapped layers, or None if any module carries an Accelerate hook.

        A plain walk over `_modules`, since `Module.modules()` builds every submodule's dotted name; with a few
        adapters loaded MiniLM has about 800 modules, and two such walks were a quarter of a merged task switch.
        Hooks are looked up in `__dict__` (`hasattr` on a module raises and catches an AttributeError per miss), and
        wrapped layers are told by their `diff_pruning_state` (`isinstance` against PEFT's abstract base is slower).
        """
        layers, stack = {}, [self.model]
        while stack:
            module = stack.pop()
            if module is None:
                continue
            attributes = module.__dict__
            if "_hf_hook" in attributes:
                return None
            children = attributes["_modules"]
            if "diff_pruning_state" in children and isinstance(module, DiffPruningLayer):
                layers[id(module)] = module
            stack.extend(children.values())
        return list(layers.values())

    def diff_layers(self) -> dict[str, DiffPruningLayer]:
        """The wrapped modules by name (relative to the base model)."""
        return {name: m for name, m in self.model.named_modules() if isinstance(m, DiffPruningLayer)}

    def expected_l0(self, adapter_name: str | None = None) -> torch.Tensor:
        """Expected number of non-zero diff entries of an adapter's gated tensors (differentiable, fp32 0-d).

        On a model sharded with FSDP (outside its forward) this is the global value, summed over the ranks with
        an all-reduce, and not differentiable: every rank must call it.
        """
        adapter_name = adapter_name or self.active_adapters[0]
        return self._weighted_l0(adapter_name, L0Weights(1.0, 1.0, self.peft_config[adapter_name].group_penalty))

    def l0_penalty(self, adapter_name: str | None = None) -> torch.Tensor:
        """The penalty added to the training loss for an adapter: `l0_lambda * E[L0]`, with the group gates of
        structured diff pruning weighted by `group_l0_lambda` (see [`DiffPruningConfig`]); differentiable, fp32.
        Sharded with FSDP, the global value from every rank (see [`expected_l0`])."""
        adapter_name = adapter_name or self.active_adapters[0]
        weights = self._l0_weights(adapter_name)
        if weights is None:
            return torch.zeros((), dtype=torch.float32)
        return self._until_target(adapter_name, self._weighted_l0(adapter_name, weights))

    def _until_target(self, adapter_name: str, term: torch.Tensor) -> torch.Tensor:
        """`term`, or 0 times it (no gradient) where `penalty_until_target` is set and at most `target_sparsity * N`
        entries of the adapter are open under the deterministic gate: what projection would keep."""
        config = self.peft_config[adapter_name]
        if not config.penalty_until_target:
            return term
        from .sparse import base_parameter_count

        budget = config.target_sparsity * base_parameter_count(self)
        return term * (self._open_entries(adapter_name).to(term.device) > budget).to(term.dtype)

    def _open_entries(self, adapter_name: str) -> torch.Tensor:
        """How many gated entries of an adapter the deterministic gate leaves open (`sigmoid(alpha) > -l / (r - l)`,
        i.e. `z > 0`; with a group gate, both), a 0-d int64 tensor: one comparison per gate logit, no autograd and
        no host synchronisation. On an FSDP2 model each rank counts its shards and one all-reduce of the per-tensor
        counts gives the global one, the same on every rank."""
        states = self._gated_states(adapter_name)
        sharded = any(state.is_sharded() for state in states)
        # one rank counts what every rank holds whole (as `local_part` does), here the "no group gate: open" flag
        first = not sharded or torch.distributed.get_rank() == 0
        counts, groups, alphas = [], [], []
        with torch.no_grad():
            for state in states:
                left, right = state.stretch
                threshold = math.log(-left / right)  # logit(-l / (r - l))
                for name in state.tensor_names:
                    if state.is_sparse(name):
                        continue
                    alpha, group = getattr(state, f"{name}_alpha"), getattr(state, f"{name}_group_alpha", None)
                    if sharded and is_fsdp1_parameter(alpha):
                        # inside FSDP1's forward the root unit's tensors are whole on every rank: each entry would
                        # be counted once per rank
                        raise NotImplementedError(
                            f"penalty_until_target cannot count the open gates of {state.module_name!r} under FSDP1: "
                            "shard the model with FSDP2 (fully_shard), or train with penalty_until_target=False."
                        )
                    count = (local_part(alpha)[0] > threshold).sum() if sharded else (alpha > threshold).sum()
                    counts.append(count)
                    if group is None:  # filled on the device: no copy from the host per tensor
                        groups.append(torch.ones_like(count) if first else torch.zeros_like(count))
                    else:  # its one entry, on the rank that holds it
                        groups.append(((local_part(group)[0] if sharded else group) > threshold).sum())
                    alphas.append(alpha)
        if not counts:
            return torch.zeros((), dtype=torch.int64)
        both = torch.stack([torch.stack(counts), torch.stack(groups)])
        if sharded:
            torch.distributed.all_reduce(both, group=shard_group(alphas))
        return (both[0] * both[1]).sum()

    def last_l0_penalty(self, adapter_name: str | None = None) -> torch.Tensor | None:
        """The value of [`l0_penalty`] that the last training forward added to the loss for an adapter (detached),
        or None if that forward added none: what a loop logs, without another pass over every gate logit."""
        return getattr(self, "_last_l0_penalty", {}).get(adapter_name or self.active_adapters[0])

    def _l0_weights(self, adapter_name: str) -> L0Weights | None:
        """How the penalty of `adapter_name` enters the loss; None when it adds nothing."""
        config = self.peft_config[adapter_name]
        group_l0_lambda = config.l0_lambda if config.group_l0_lambda is None else config.group_l0_lambda
        if config.l0_lambda == 0 and group_l0_lambda == 0:
            return None
        return L0Weights(config.l0_lambda, group_l0_lambda, config.group_penalty)

    def _gated_states(self, adapter_name: str) -> list[DiffState]:
        layers = self.diff_layers().values()
        return [layer.diff_pruning_state[adapter_name] for layer in layers if adapter_name in layer.diff_pruning_state]

    def _weighted_l0(
        self, adapter_name: str, weights: L0Weights, states: list[DiffState] | None = None, recorded=None
    ) -> torch.Tensor:
        states = self._gated_states(adapter_name) if states is None else states
        if recorded is None and any(state.is_sharded() for state in states):
            return sharded_weighted_l0(states, weights)
        total = torch.zeros((), dtype=torch.float32)
        for state in states:
            term = _state_penalty(state, weights, recorded)
            total = total.to(term.device) + term
        return total

    def _post_injection_hook(self, model: nn.Module, config: DiffPruningConfig, adapter_name: str) -> None:
        # A forward hook on the model itself, not an override of this tuner's forward: PeftModel without a task
        # type calls the base model directly, and the penalty must be in the loss on every path.
        if getattr(self, "_l0_hook", None) is None:
            self._l0_hook = (
                model.register_forward_pre_hook(self._collect_l0_penalty),
                model.register_forward_hook(self._add_l0_penalty, with_kwargs=True),
            )

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> nn.Module:
        # the unloaded model is a plain model again: it must not keep adding a penalty of adapters it no longer has
        if getattr(self, "_l0_hook", None) is not None:
            for handle in self._l0_hook:
                handle.remove()
            self._l0_hook = None
        return super()._unload_and_optionally_merge(*args, **kwargs)

    def _collect_l0_penalty(self, module: nn.Module, args: Any) -> None:
        """Before a training forward: let the gated layers record their penalty terms (see [`_add_l0_penalty`])."""
        close_penalty_terms(id(self))
        self._last_l0_penalty = {}
        if not (module.training and torch.is_grad_enabled()):
            return
        states, weights = {}, {}
        for adapter_name in self.active_adapters:
            config = self.peft_config[adapter_name]
            if config.candidate_pool is not None and not config.pool_pattern and not config.kept_pattern:
                raise RuntimeError(
                    f"Adapter {adapter_name!r} gates a candidate pool that was not chosen yet: call "
                    "select_pool(model, batches) before training (see docs/concepts.md)."
                )
            adapter_weights = self._l0_weights(adapter_name)
            if adapter_weights is not None and not self.peft_config[adapter_name].kept_pattern:
                states[adapter_name], weights[adapter_name] = self._gated_states(adapter_name), adapter_weights
        open_penalty_terms(PenaltyTerms(id(self), states, weights))

    def _add_l0_penalty(self, module: nn.Module, args: Any, kwargs: dict, outputs: Any) -> Any:
        """Add `l0_lambda * E[L0]` of every active gated adapter to the loss the model returned, in training mode.

        The loss is `outputs.loss`, or with `return_dict=False` the first element of the tuple when labels were
        passed (transformers' convention). Each gated layer computed its tensors' terms in its own forward, as an
        output of the autograd node that samples the gates: their gradient is then computed in that module's
        backward, which under FSDP is when its parameters are gathered (a penalty over all logits computed here,
        after the forward, would see them sharded). The value is that of [`l0_penalty`].
        """
        recorded = close_penalty_terms(id(self))
        as_tuple = isinstance(outputs, tuple) and kwargs.get("labels") is not None
        loss = outputs[0] if as_tuple else getattr(outputs, "loss", None)
        if not (module.training and isinstance(loss, torch.Tensor) and loss.dim() == 0) or self._adapters_disabled():
            return outputs
        penalty = torch.zeros((), dtype=torch.float32, device=loss.device)
        for adapter_name in self.active_adapters:
            weights = self._l0_weights(adapter_name)
            if weights is not None and not self.peft_config[adapter_name].kept_pattern:
                # in fp32: E[L0] counts millions of gates, beyond fp16's range
                if recorded is None:
                    # grad disabled in training mode: no layer recorded a term, the loss still gets the value
                    term = self._until_target(adapter_name, self._weighted_l0(adapter_name, weights))
                else:
                    term = self._weighted_l0(adapter_name, weights, recorded.states.get(adapter_name), recorded)
                    term = self._until_target(adapter_name, term)
                self._last_l0_penalty[adapter_name] = term.detach()
                penalty = penalty + term.to(loss.device)
        loss = (loss.float() + penalty).to(loss.dtype)
        if as_tuple:
            return (loss, *outputs[1:])
        outputs.loss = loss
        return outputs

    def _adapters_disabled(self) -> bool:
        layers = self.diff_layers().values()
        return bool(layers) and all(layer.disable_adapters for layer in layers)


def get_tuner(model: nn.Module) -> DiffPruningModel:
    """The `DiffPruningModel` inside a `PeftModel` (or the tuner itself); a clear error for anything else."""
    for candidate in (model, getattr(model, "base_model", None)):
        if isinstance(candidate, DiffPruningModel):
            return candidate
    raise TypeError(
        f"Expected a model adapted with DiffPruningConfig (a PeftModel from get_peft_model), got "
        f"{type(model).__name__}. Wrap it first: get_peft_model(model, DiffPruningConfig(...))."
    )


def expected_l0(model: nn.Module, adapter_name: str | None = None) -> torch.Tensor:
    """Expected number of non-zero diff entries of the (active) adapter: a differentiable fp32 scalar."""
    return get_tuner(model).expected_l0(adapter_name)
