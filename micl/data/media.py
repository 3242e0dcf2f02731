"""Media loading: images (PIL), audio (stdlib ``wave`` / PyAV), video frames (PyAV).

Every failure -- missing file, unreadable / corrupt / truncated data, no frames or
samples -- raises ``micl.errors.MediaError(path, reason)``.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
from PIL import Image

from micl.errors import MediaError

__all__ = ["PREPROCESSING_VERSION", "load_image", "load_audio", "load_video"]

# Part of the feature store's key: bump it when a change to micl alters the features an unchanged encoder makes
# of an unchanged file (decoding, compositing, resampling, frame selection here; an encoder's own input transform
# or pooling code), so the stores built before are not used (docs/feature_store.md).
PREPROCESSING_VERSION = 1


def _check_file(path) -> Path:
    p = Path(path)
    if not p.exists():
        raise MediaError(p, "file not found")
    if not p.is_file():
        raise MediaError(p, "not a regular file")
    if p.stat().st_size == 0:
        raise MediaError(p, "empty file (0 bytes)")
    return p


def _short(exc: BaseException) -> str:
    msg = str(exc).strip() or type(exc).__name__
    return msg if len(msg) <= 200 else msg[:197] + "..."


# --------------------------------------------------------------------------- images


def load_image(path) -> Image.Image:
    """Load an image as an RGB ``PIL.Image`` (transparent pixels composited on white)."""
    p = _check_file(path)
    try:
        with Image.open(p) as img:
            img.load()  # decode fully now: truncated / corrupt data fails here
            has_alpha = img.mode in ("RGBA", "LA", "PA") or (
                img.mode == "P" and "transparency" in img.info)
            if has_alpha:
                rgba = img.convert("RGBA")
                out = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                out.alpha_composite(rgba)
                return out.convert("RGB")
            return img.convert("RGB")
    except MediaError:
        raise
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise MediaError(p, f"cannot decode image ({_short(e)})") from None


# --------------------------------------------------------------------------- audio


def _read_wav_pcm16(p: Path):
    """Read a PCM WAV with the stdlib. Returns (samples float32 mono, rate), or None
    when the file is a WAV the stdlib cannot handle (left to PyAV)."""
    try:
        w = wave.open(str(p), "rb")
    except (wave.Error, EOFError):
        return None  # not RIFF/PCM (float, compressed...) or garbage: PyAV decides
    with w:
        nch, width, rate, nframes = (w.getnchannels(), w.getsampwidth(),
                                     w.getframerate(), w.getnframes())
        raw = w.readframes(nframes)
    if nch < 1 or rate <= 0:
        raise MediaError(p, f"invalid WAV header (channels={nch}, rate={rate})")
    frame_bytes = nch * width
    got = len(raw) // frame_bytes if frame_bytes else 0
    # A declared size of ~4 GiB is the "unknown length" convention of streaming writers.
    if got < nframes and nframes * frame_bytes < 0xFFFF0000:
        raise MediaError(p, f"truncated WAV: header declares {nframes} frames, found {got}")
    if got == 0:
        raise MediaError(p, "no audio samples")
    if width != 2:
        return None  # 8/24/32-bit PCM: decode and convert with PyAV
    x = np.frombuffer(raw[: got * frame_bytes], dtype="<i2").astype(np.float32) / 32768.0
    if nch > 1:
        x = x.reshape(-1, nch).mean(axis=1)
    return x, rate


def _decode_audio_av(p: Path, sampling_rate: int) -> np.ndarray:
    import av

    chunks = []
    try:
        with av.open(str(p)) as container:
            if not container.streams.audio:
                raise MediaError(p, "no audio stream")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sampling_rate)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except MediaError:
        raise
    except Exception as e:  # av.error.FFmpegError subclasses, OSError, ValueError
        raise MediaError(p, f"cannot decode audio ({_short(e)})") from None
    if not chunks:
        raise MediaError(p, "no audio samples")
    x = np.concatenate(chunks).astype(np.float32, copy=False)
    if x.size == 0:
        raise MediaError(p, "no audio samples")
    return x


def load_audio(path, sampling_rate: int = 16000) -> np.ndarray:
    """Load audio as a mono float32 array in [-1, 1] at ``sampling_rate`` Hz.

    16-bit PCM WAV at the requested rate is read with the stdlib ``wave`` module; any
    other WAV or container/codec (mp3, flac, ogg, m4a...) is decoded and resampled
    with PyAV (libswresample).
    """
    p = _check_file(path)
    if sampling_rate <= 0:
        raise ValueError(f"sampling_rate must be positive, got {sampling_rate}")
    if p.suffix.lower() in (".wav", ".wave"):
        got = _read_wav_pcm16(p)
        if got is not None:
            x, rate = got
            if rate == sampling_rate:
                return np.ascontiguousarray(x, dtype=np.float32)
    return _decode_audio_av(p, sampling_rate)


# --------------------------------------------------------------------------- video


def _frame_indices(total: int, num_frames: int) -> list[int]:
    """``num_frames`` indices spread uniformly over [0, total-1], endpoints included
    (repeats when the video is shorter than ``num_frames``)."""
    if num_frames == 1:
        return [(total - 1) // 2]
    return [int(round(i)) for i in np.linspace(0, total - 1, num_frames)]


def _decode_selected(p: Path, wanted: set[int]):
    """Decode the first video stream, keeping the frames whose index is in ``wanted``.
    Returns (dict index -> PIL image, number of frames decoded)."""
    import av

    kept: dict[int, Image.Image] = {}
    n = 0
    try:
        with av.open(str(p)) as container:
            if not container.streams.video:
                raise MediaError(p, "no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                if n in wanted:
                    kept[n] = frame.to_image().convert("RGB")
                n += 1
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(p, f"cannot decode video ({_short(e)})") from None
    return kept, n


def _declared_frames(p: Path) -> int:
    import av

    try:
        with av.open(str(p)) as container:
            if not container.streams.video:
                raise MediaError(p, "no video stream")
            return int(container.streams.video[0].frames or 0)
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(p, f"cannot open video ({_short(e)})") from None


def load_video(path, num_frames: int = 4) -> list[Image.Image]:
    """Return ``num_frames`` RGB frames sampled uniformly over the whole video
    (first and last frame included; frames repeat if the video is shorter)."""
    p = _check_file(path)
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    declared = _declared_frames(p)
    if declared > 0:
        idx = _frame_indices(declared, num_frames)
        kept, n = _decode_selected(p, set(idx))
        if n == declared:
            return [kept[i] for i in idx]
        if n == 0:
            raise MediaError(p, "video has zero decodable frames")
        # Containers are often off by a frame or two (edit lists, B-frames); far fewer
        # frames than declared means the data is cut short.
        if declared - n > max(1, declared // 10):
            raise MediaError(p, f"truncated or corrupt video: header declares {declared} "
                                f"frames, decoded {n}")
        # decode again, sampling over the real count
        idx = _frame_indices(n, num_frames)
        kept, n2 = _decode_selected(p, set(idx))
        if any(i not in kept for i in idx):
            raise MediaError(p, f"video frames changed between decodes ({n} vs {n2})")
        return [kept[i] for i in idx]
    # Unknown frame count: count first (cheap, nothing kept), then pick.
    _, n = _decode_selected(p, set())
    if n == 0:
        raise MediaError(p, "video has zero decodable frames")
    idx = _frame_indices(n, num_frames)
    kept, _ = _decode_selected(p, set(idx))
    if any(i not in kept for i in idx):
        raise MediaError(p, "video frames changed between decodes")
    return [kept[i] for i in idx]
