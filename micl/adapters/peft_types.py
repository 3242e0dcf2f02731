"""Adding micl's tuner names to PEFT's `PeftType` enum.

`peft.utils.peft_types.register_peft_method` (PEFT's public way to add a tuner) requires `name.upper()`
to be a `PeftType` member, and PEFT's own tuners are members because they are listed in the enum's
source; PEFT offers no public call to add one, so the member is added here. A str-Enum member is a str,
so `PeftType.MOE_LORA`, `PeftType("MOE_LORA")`, `list(PeftType)` and the `"peft_type": "MOE_LORA"` of a
saved adapter_config.json all resolve to it.
"""

from __future__ import annotations

from peft.utils import PeftType


def extend_peft_type(name: str) -> PeftType:
    """The `PeftType` member `name` (upper case), added if it is not there yet. Idempotent."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    if hasattr(PeftType, "_sort_order_"):
        member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member
