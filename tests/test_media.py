import wave

import numpy as np
import pytest
from PIL import Image

from micl.data.media import load_audio, load_image, load_video
from micl.errors import DataError, MediaError

GARBAGE = bytes(range(256)) * 8


def _wav(path, x, sr=16000, width=2, channels=1):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(sr)
        if width == 2:
            w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
        else:  # 8-bit unsigned
            w.writeframes(((np.clip(x, -1, 1) * 127) + 128).astype(np.uint8).tobytes())


def _mp4(path, n=8, size=64, faststart=False):
    """faststart: the moov header (frame table) is written before the mdat frame data."""
    import av

    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", format="mp4", options=options) as c:
        s = c.add_stream("mpeg4", rate=8)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for i in range(n):
            fr = np.full((size, size, 3), i * 30, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(fr, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _tone(sr, seconds=0.5, f=440.0):
    t = np.arange(int(sr * seconds)) / sr
    return 0.5 * np.sin(2 * np.pi * f * t)


@pytest.mark.parametrize("loader", [load_image, load_audio, load_video])
def test_missing_file(tmp_path, loader):
    p = tmp_path / "nope.bin"
    with pytest.raises(MediaError) as ei:
        loader(p)
    assert ei.value.path == str(p) and "not found" in ei.value.reason
    assert str(p) in str(ei.value)
    assert isinstance(ei.value, DataError)


@pytest.mark.parametrize("name,loader", [("x.png", load_image), ("x.wav", load_audio),
                                         ("x.mp4", load_video), ("x.mp3", load_audio)])
def test_garbage_bytes(tmp_path, name, loader):
    p = tmp_path / name
    p.write_bytes(GARBAGE)
    with pytest.raises(MediaError) as ei:
        loader(p)
    assert ei.value.path == str(p) and str(p) in str(ei.value)


@pytest.mark.parametrize("name,loader", [("e.png", load_image), ("e.wav", load_audio),
                                         ("e.mp4", load_video)])
def test_empty_file(tmp_path, name, loader):
    p = tmp_path / name
    p.write_bytes(b"")
    with pytest.raises(MediaError, match="empty"):
        loader(p)


def test_directory_is_not_media(tmp_path):
    with pytest.raises(MediaError, match="not a regular file"):
        load_image(tmp_path)


def test_image_roundtrip_and_truncated(tmp_path):
    arr = np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8)
    p = tmp_path / "a.png"
    Image.fromarray(arr).save(p)
    img = load_image(p)
    assert img.mode == "RGB" and img.size == (40, 48)
    assert np.array_equal(np.asarray(img), arr)
    t = tmp_path / "t.png"
    t.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    with pytest.raises(MediaError) as ei:
        load_image(t)
    assert ei.value.path == str(t)


def test_image_alpha_and_grayscale(tmp_path):
    p = tmp_path / "rgba.png"
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(p)
    assert load_image(p).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    g = tmp_path / "g.png"
    Image.new("L", (8, 8), 7).save(g)
    assert load_image(g).getpixel((3, 3)) == (7, 7, 7)


def test_wav_pcm16(tmp_path):
    x = _tone(16000)
    p = tmp_path / "a.wav"
    _wav(p, x)
    y = load_audio(p)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.max(np.abs(y - x)) < 1e-3


def test_wav_stereo_is_mixed_to_mono(tmp_path):
    x = _tone(16000)
    stereo = np.stack([x, np.zeros_like(x)], axis=1).reshape(-1)
    p = tmp_path / "s.wav"
    _wav(p, stereo, channels=2)
    y = load_audio(p)
    assert y.shape == x.shape and np.max(np.abs(y - x / 2)) < 1e-3


def test_wav_resampled_and_8bit_via_pyav(tmp_path):
    p = tmp_path / "44k.wav"
    _wav(p, _tone(44100, seconds=1.0), sr=44100)
    y = load_audio(p, sampling_rate=16000)
    assert y.dtype == np.float32 and y.ndim == 1 and abs(len(y) - 16000) <= 64
    spec = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spec) * 16000 / len(y) - 440) < 5
    q = tmp_path / "8bit.wav"
    _wav(q, _tone(16000), width=1)
    z = load_audio(q)
    assert z.dtype == np.float32 and abs(len(z) - 8000) <= 64 and np.abs(z).max() > 0.3


def test_truncated_wav(tmp_path):
    p = tmp_path / "a.wav"
    _wav(p, _tone(16000))
    t = tmp_path / "t.wav"
    t.write_bytes(p.read_bytes()[:5000])
    with pytest.raises(MediaError, match="truncated") as ei:
        load_audio(t)
    assert ei.value.path == str(t)


def test_wav_with_no_samples(tmp_path):
    p = tmp_path / "z.wav"
    _wav(p, np.zeros(0))
    with pytest.raises(MediaError, match="no audio samples"):
        load_audio(p)


def test_video_uniform_sampling(tmp_path):
    p = tmp_path / "v.mp4"
    _mp4(p, n=8)
    frames = load_video(p, num_frames=4)
    assert len(frames) == 4 and frames[0].mode == "RGB" and frames[0].size == (64, 64)
    levels = [np.asarray(f).mean() for f in frames]
    # frames 0, 2, 5, 7 of a ramp 0, 30, ..., 210
    assert np.allclose(levels, [0, 60, 150, 210], atol=6)
    assert len(load_video(p, num_frames=12)) == 12  # repeats when too short


def test_truncated_mp4(tmp_path):
    p = tmp_path / "v.mp4"
    _mp4(p)
    t = tmp_path / "t.mp4"
    t.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    with pytest.raises(MediaError) as ei:
        load_video(t)
    assert ei.value.path == str(t)


def test_audio_file_has_no_video_frames(tmp_path):
    p = tmp_path / "a.wav"
    _wav(p, _tone(16000))
    with pytest.raises(MediaError, match="no video stream"):
        load_video(p)


@pytest.mark.parametrize("keep", [4, 300])
def test_mp4_with_header_but_cut_data(tmp_path, keep):
    # moov (frame table) before mdat: the header survives, the frames do not
    p = tmp_path / "fs.mp4"
    _mp4(p, faststart=True)
    data = p.read_bytes()
    cut = data.index(b"mdat") + keep
    t = tmp_path / "cut.mp4"
    t.write_bytes(data[:cut])
    with pytest.raises(MediaError, match="zero decodable frames|truncated") as ei:
        load_video(t)
    assert ei.value.path == str(t)
    assert len(load_video(p)) == 4  # the intact file is fine
