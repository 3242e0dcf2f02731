"""micl: continual fine-tuning of multimodal LLMs."""

from . import adapters  # noqa: F401  (registers micl's PEFT tuners with PEFT)
