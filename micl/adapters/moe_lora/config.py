"""MoeLoraConfig: the PEFT config of top-k routed LoRA experts (see `micl/adapters/moe_lora/__init__.py`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from ...errors import ConfigError
from ..peft_types import extend_peft_type

ROUTING_MODES = ("token", "sample")


class MoeLoraConfigError(ConfigError, ValueError):
    """A bad MoeLoraConfig value: a micl ConfigError (one-line CLI message) and a ValueError (PEFT style)."""


MOE_LORA = extend_peft_type("MOE_LORA")


@dataclass
class MoeLoraConfig(PeftConfig):
    """E LoRA experts per adapted Linear plus a router (Linear in_features -> E, no bias) per module.

    output = base(x) + sum over the top-k experts e of w_e * (lora_alpha / r) * B_e A_e dropout(x), with w the
    softmax of the router logits over the k chosen experts only. `routing="token"` routes every token on its
    own hidden state; `routing="sample"` routes all tokens of a sample by the router logits of the mean of the
    sample's prompt tokens (non-padding, label -100) in that layer; see the package docstring."""

    r: int = field(default=8, metadata={"help": "rank of every LoRA expert"})
    lora_alpha: int = field(default=8, metadata={"help": "scaling = lora_alpha / r, as in LoRA"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the experts' input"})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Linear modules to adapt (names or a regex), as LoraConfig"})
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "modules not to adapt (names or a regex)"})
    num_experts: int = field(default=10, metadata={"help": "LoRA experts per adapted module (E)"})
    top_k: int = field(default=2, metadata={"help": "experts each routing unit (token or sample) goes to"})
    routing: str = field(default="token", metadata={
        "help": "token: every token routed on its own hidden state; sample: one decision per sample from the "
                "mean of its prompt tokens"})
    router_init_std: float = field(default=0.02, metadata={"help": "std of the router's normal init"})
    init_weights: bool = field(default=True, metadata={
        "help": "True: A kaiming-uniform, B zero (the adapter starts as the identity, as LoRA); False: B random "
                "too (tests)"})
    bias: str = field(default="none", metadata={"help": "only 'none' is supported"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "as LoraConfig"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None)
    layers_pattern: Optional[Union[list[str], str]] = field(default=None)

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = MOE_LORA
        self.target_modules = (set(self.target_modules) if isinstance(self.target_modules, list)
                               else self.target_modules)
        self.exclude_modules = (set(self.exclude_modules) if isinstance(self.exclude_modules, list)
                                else self.exclude_modules)
        self.validate()

    def validate(self) -> None:
        def bad(key: str, message: str):
            raise MoeLoraConfigError(f"moe_lora: {key} {message} (recipe key 'lora.{key}')")

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if not is_int(self.r) or self.r < 1:
            bad("r", f"must be an integer >= 1, got {self.r!r}")
        if not is_int(self.num_experts) or self.num_experts < 1:
            bad("num_experts", f"must be an integer >= 1, got {self.num_experts!r}")
        if not is_int(self.top_k) or not 1 <= self.top_k <= self.num_experts:
            bad("top_k", f"must be an integer between 1 and num_experts ({self.num_experts}), got {self.top_k!r}")
        if self.routing not in ROUTING_MODES:
            bad("routing", f"must be one of {', '.join(ROUTING_MODES)}, got {self.routing!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            bad("dropout", f"must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias != "none":
            raise MoeLoraConfigError(f"moe_lora: bias must be 'none', got {self.bias!r}")
