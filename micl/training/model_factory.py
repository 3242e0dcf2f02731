"""The model a run trains: the recipe's LLM with a fresh adapter and one projector per encoder's modality."""

from __future__ import annotations

from transformers import set_seed

from ..adapters import build_peft_config
from ..config import RecipeConfig
from ..modeling.llm import load_llm
from ..modeling.multimodal import MultimodalLM
from ..utils.distributed import launch_device, main_process_first, plain_model_loading
from .task_data import TaskData


def build_model(config: RecipeConfig, data: TaskData) -> MultimodalLM:
    cfg = config.model
    media_dims = data.media_dims()  # the encoders first: a bad one fails before the (larger) LLM loads
    set_seed(config.seed)
    # the embedded LLM is converted and cached on first use; loaded whole (see plain_model_loading)
    with main_process_first(), plain_model_loading():
        llm, tokenizer = load_llm(cfg.llm, cfg.dtype, cfg.trust_remote_code, cfg.attn_implementation)
    settings = {"llm": cfg.llm, "dtype": cfg.dtype, "trust_remote_code": cfg.trust_remote_code,
                "projector_hidden": cfg.projector_hidden, "system_prompt": cfg.system_prompt,
                "encoders": {m: e.identity for m, e in data.encoders.items()}}
    model = MultimodalLM.with_adapter(llm, tokenizer, media_dims, build_peft_config(config.lora),
                                      cfg.projector_hidden, settings)
    return model.to(launch_device())  # the evaluations before the first Trainer run there too
