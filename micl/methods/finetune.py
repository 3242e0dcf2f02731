"""Sequential fine-tuning: the lower bound of continual learning. Each task is learned with the plain
cross-entropy, starting from the previous step's adapter and projectors; nothing protects old tasks."""

from .base import ContinualMethod
from .registry import register


@register
class Finetune(ContinualMethod):
    name = "finetune"
