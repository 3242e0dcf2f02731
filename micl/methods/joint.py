"""Joint multi-task training: the upper bound of continual learning. One step trains on the union of all the
order's tasks at once (their training sets shuffled together, plain cross-entropy), then every task is
evaluated: a results matrix of one row, with no forgetting, BWT or FWT (nothing is learned after anything)."""

from .base import ContinualMethod
from .registry import register


@register
class Joint(ContinualMethod):
    name = "joint"
    schedule = "joint"
