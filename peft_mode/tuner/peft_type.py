"""The "MODE" member of `peft.utils.PeftType`.

`peft.register_peft_method` accepts only names that already exist in the `PeftType`
enum, and peft 0.21 ships no MoDE member. This module adds it once, in place, so that
`PeftType.MODE`, `PeftType("MODE")` and `"MODE" in list(PeftType)` all work, and
configs saved with ``"peft_type": "MODE"`` map back to the same member.
"""

from __future__ import annotations

from peft.utils import PeftType

MODE_TYPE_NAME = "MODE"


def _add_peft_type_member(name: str) -> PeftType:
    """Add ``name`` to `PeftType` and return the member; return the existing one if present."""
    existing = PeftType._member_map_.get(name)
    if existing is not None:
        return existing

    # A str-valued Enum member is a str instance of the enum class carrying _name_ and _value_.
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    if hasattr(PeftType, "_sort_order_") or any(hasattr(m, "_sort_order_") for m in PeftType):
        member._sort_order_ = len(PeftType._member_names_)

    # NOTE: these are the private tables of `enum.EnumType` (Python 3.10 to 3.13). Lookups by
    # name (PeftType["MODE"]), by value (PeftType("MODE")) and iteration read them.
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    # EnumType.__setattr__ rejects assignments to member names, so set the class attribute directly.
    type.__setattr__(PeftType, name, member)
    return member


MODE_PEFT_TYPE = _add_peft_type_member(MODE_TYPE_NAME)
