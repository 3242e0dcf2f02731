"""Zero-shot: the lower bound of every table. The model as built (the LLM, its untrained LoRA, which starts as
a no-op, and the freshly initialised projectors) is evaluated on every task of the order without any training:
the same evaluation `eval.forward_transfer` runs on the initial model, as a results matrix of one row."""

from .base import ContinualMethod
from .registry import register


@register
class ZeroShot(ContinualMethod):
    name = "zeroshot"
    schedule = "untrained"
