"""GatedLoraConfig: the settings of Harmony's gated low-rank adapter (see layer.py for the arithmetic)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from ..peft_types import extend_peft_type

PEFT_TYPE_NAME = "GATED_LORA"


extend_peft_type(PEFT_TYPE_NAME)


@dataclass
class GatedLoraConfig(PeftConfig):
    """Gated LoRA: W = W0 + omega * scaling * B A per adapted module, omega = gate_max * sigmoid(g) a learned
    scalar gate of that module (one per module and adapter), scaling = lora_alpha / r as in LoRA. By default
    omega starts at 1 (gate_init 1.0 of gate_max 2.0): a fresh gated adapter trains at plain LoRA's scale, and
    the gate can close the module (omega -> 0) or open it up to twice that."""

    r: int = field(default=8, metadata={"help": "rank of A [r, in] and B [out, r] (Harmony's paper: 128)"})
    lora_alpha: float = field(default=8, metadata={"help": "scaling = lora_alpha / r"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input"})
    gate_init: float = field(default=1.0, metadata={
        "help": "omega at initialisation, in (0, gate_max); 1.0 = plain LoRA's scale. The gate logit starts at "
                "logit(gate_init / gate_max)"})
    gate_max: float = field(default=2.0, metadata={
        "help": "upper bound of omega = gate_max * sigmoid(g). Adapters saved before this setting existed have "
                "no gate_max in their adapter_config.json and load with 1.0, their omega = sigmoid(g)"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={
        "help": "module names (exact or suffix match) or a regex; 'all-linear' for every linear layer but the "
                "output layer; None = PEFT's LoRA defaults for known architectures"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={
        "help": "module names or a regex not to adapt"})
    init_weights: bool = field(default=True, metadata={
        "help": "True: A Kaiming-uniform, B zero (the adapter starts as the identity); False: B random too "
                "(tests only)"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={
        "help": "only these layer indices"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={
        "help": "name of the layer list, with layers_to_transform"})
    bias: Literal["none"] = field(default="none", metadata={"help": "biases are never trained"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={
        "help": "other modules trained and saved with the adapter"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType[PEFT_TYPE_NAME]
        self.target_modules = set(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules
        self.exclude_modules = (set(self.exclude_modules) if isinstance(self.exclude_modules, list)
                                else self.exclude_modules)
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"GatedLoraConfig: r must be a positive integer, got {self.r!r}")
        if not float(self.gate_max) > 0.0:
            raise ValueError(f"GatedLoraConfig: gate_max must be > 0, got {self.gate_max!r}")
        if not 0.0 < float(self.gate_init) < float(self.gate_max):
            raise ValueError(f"GatedLoraConfig: gate_init must be in (0, {float(self.gate_max):g}) "
                             f"(omega = {float(self.gate_max):g} * sigmoid(gate)), got {self.gate_init!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"GatedLoraConfig: lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias != "none":
            raise ValueError(f"GatedLoraConfig: bias must be 'none', got {self.bias!r}")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("GatedLoraConfig: layers_to_transform cannot be used when target_modules is a str")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("GatedLoraConfig: layers_pattern needs layers_to_transform")

    @property
    def gate_logit(self) -> float:
        g = float(self.gate_init) / float(self.gate_max)
        return math.log(g / (1.0 - g))

    @classmethod
    def check_kwargs(cls, **kwargs):
        """A saved adapter_config.json without `gate_max` was written when omega was sigmoid(g): it loads with
        gate_max 1.0, so that its saved gate logits give the omega they were trained with."""
        kwargs = super().check_kwargs(**kwargs)
        if "gate_max" not in kwargs:
            kwargs["gate_max"] = 1.0
        return kwargs
