"""micl: continual fine-tuning of multimodal LLMs.

Importing micl loads neither PyTorch, transformers nor PEFT: each module imports what it needs (micl's PEFT
tuners register with PEFT when micl.adapters is imported, which micl.modeling.multimodal does).
"""
