"""Registration of diff pruning with PEFT's own mappings.

PEFT 0.21 has no plugin mechanism: `register_peft_method` accepts only names that are members of the closed
`PeftType` enum. We add the member first, then register through PEFT's function so that the config, tuner and
prefix mappings are filled exactly as for an in-tree method.
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType, register_peft_method


def add_peft_type(name: str) -> PeftType:
    """Add `name` (upper case) to `PeftType` as a member whose value equals its name. Idempotent."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_names_.append(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    # Enum members are also class attributes (`PeftType.DIFF_PRUNING`); type.__setattr__ bypasses the enum guard
    type.__setattr__(PeftType, name, member)
    return member


def register(name: str, config_cls: type, model_cls: type) -> None:
    """Register a PEFT method under `name` (lower case). Calling it again (a reload of the package or of its
    modules, as Jupyter's autoreload does) points PEFT's mappings at the new classes instead of failing."""
    peft_type = add_peft_type(name.upper())
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
        return
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls)
