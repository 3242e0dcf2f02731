"""micl-synth: a small, deterministic multimodal benchmark generated in seconds.

Six tasks (image / audio / video x captioning / QA), plus one audio-visual captioning task (a video
with a sound track, described by both), built from a tiny templated
vocabulary, so a 135M LLM with LoRA and a handful of pooled media tokens can learn each
one in a few hundred steps, while each task's own phrasing and answer words make it
easy to overwrite (forget) when the next task is trained. See docs/synth.md.

    from micl.data.synth import generate_synth
    generate_synth("data/synth", seed=0)

or ``micl data synth --out data/synth --seed 0`` (micl/cli.py).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import wave
import zlib
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from micl.data.schema import validate_sample
from micl.data.tasks import get_task
from micl.errors import ConfigError

GENERATOR_NAME = "micl-synth"
GENERATOR_VERSION = "1.1"  # 1.1: synth_av_caption; videos converted to YUV by micl (run-to-run identical bytes)

SYNTH_TASKS = (
    "synth_image_caption",
    "synth_image_qa",
    "synth_audio_caption",
    "synth_audio_qa",
    "synth_video_caption",
    "synth_video_qa",
    "synth_av_caption",
)
SPLITS = ("train", "val", "test")
DEFAULT_COUNTS = {"train": 64, "val": 48, "test": 96}

IMAGE_SIZE = 224
AUDIO_SR = 16000
VIDEO_FRAMES = 8
VIDEO_FPS = 8
VIDEO_SIZES = (64, 80, 96, 112)

# ---------------------------------------------------------------------------- vocab

COLORS = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 75, 215),
    "yellow": (240, 210, 30),
}
SHAPES = ("circle", "square", "triangle")
# relative centre of each named position in the image
POSITIONS = {
    "left": (0.25, 0.50),
    "right": (0.75, 0.50),
    "top": (0.50, 0.25),
    "bottom": (0.50, 0.75),
    "center": (0.50, 0.50),
}
# (main phrase, paraphrase, short form)
POSITION_PHRASES = {
    "left": ("on the left", "at the left side", "left side"),
    "right": ("on the right", "at the right side", "right side"),
    "top": ("at the top", "near the top", "top side"),
    "bottom": ("at the bottom", "near the bottom", "bottom side"),
    "center": ("in the center", "in the middle", "center"),
}
PITCHES = {"low": 250.0, "middle": 700.0, "high": 2000.0}  # Hz, centre of the tone
PATTERNS = ("steady", "beeping", "rising", "falling")
DIRECTIONS = ("left", "right", "up", "down")
DIRECTION_PHRASES = {  # (main, paraphrase, paraphrase, short)
    "right": ("moving to the right", "moves to the right", "sliding right", "moving right"),
    "left": ("moving to the left", "moves to the left", "sliding left", "moving left"),
    "up": ("moving up", "moves upward", "sliding up", "moving up"),
    "down": ("moving down", "moves downward", "sliding down", "moving down"),
}
NUM_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
TIMES_WORDS = {1: "once", 2: "twice", 3: "three times", 4: "four times"}

QUESTIONS = {
    "synth_image_qa": {
        "color": "what color is the shape?",
        "shape": "what shape is shown?",
        "count": "how many shapes are there?",
        "position": "where is the shape?",
    },
    "synth_audio_qa": {
        "pitch": "is the pitch high or low?",
        "beeping": "is the sound beeping?",
        "count": "how many beeps?",
        "direction": "is the pitch rising or falling?",
    },
    "synth_video_qa": {
        "direction": "which direction does the shape move?",
        "color": "what color is the moving shape?",
        "shape": "what shape is moving?",
    },
}


# ---------------------------------------------------------------------------- helpers


def _task_key(task: str) -> int:
    return zlib.crc32(task.encode("utf-8"))


def _balanced(rng: np.random.Generator, values: Sequence, n: int) -> list:
    """n values, every value used floor(n/k) or ceil(n/k) times, in random order."""
    values = list(values)
    k = len(values)
    out = values * (n // k)
    if n % k:
        out += [values[i] for i in rng.choice(k, n % k, replace=False)]
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def _qa_plan(rng: np.random.Generator, answers_by_q: dict[str, Sequence], n: int):
    """Balanced (question type, answer) pairs: question types balanced, and inside each
    question type the answers balanced. Returns a list of (qtype, answer)."""
    qtypes = _balanced(rng, list(answers_by_q), n)
    answers: list = [None] * n
    for q, vals in answers_by_q.items():
        idx = [i for i, qt in enumerate(qtypes) if qt == q]
        for i, a in zip(idx, _balanced(rng, vals, len(idx))):
            answers[i] = a
    return list(zip(qtypes, answers))


def _jitter_color(rng, rgb, amount=18):
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _background(rng):
    g = int(rng.integers(70, 196))
    return tuple(int(np.clip(g + rng.integers(-8, 9), 0, 255)) for _ in range(3))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill):
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = r * 0.88  # about the same area as the circle
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r * 1.05), (cx - r * 1.05, cy + r * 0.8),
                      (cx + r * 1.05, cy + r * 0.8)], fill=fill)
    else:  # pragma: no cover - internal
        raise ValueError(shape)


def _answer_refs(answer: str) -> list[str]:
    if answer in ("1", "2", "3", "4"):
        return [answer, NUM_WORDS[int(answer)]]
    if answer in SHAPES:
        return [answer, f"a {answer}"]
    if answer in POSITION_PHRASES:
        refs = [answer, POSITION_PHRASES[answer][0]]
        if answer == "center":
            refs.append("middle")
        return refs
    if answer in DIRECTIONS:
        return {"right": ["right", "to the right"], "left": ["left", "to the left"],
                "up": ["up", "upward", "upwards"], "down": ["down", "downward", "downwards"]}[answer]
    return [answer]


# ---------------------------------------------------------------------------- images


def _image_scene(rng, objects, bg=None) -> Image.Image:
    """objects: list of (shape, color_name, cx, cy, r) in pixels."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), bg or _background(rng))
    draw = ImageDraw.Draw(img)
    for shape, color, cx, cy, r in objects:
        _draw_shape(draw, shape, cx, cy, r, _jitter_color(rng, COLORS[color]))
    return img


def _at_position(rng, pos: str, jitter=0.03):
    fx, fy = POSITIONS[pos]
    j = jitter * IMAGE_SIZE
    return fx * IMAGE_SIZE + rng.uniform(-j, j), fy * IMAGE_SIZE + rng.uniform(-j, j)


def _save_png(img: Image.Image, path: Path):
    img.save(path, format="PNG", optimize=False, compress_level=6)


def _plan_image_caption(rng, n):
    n_two = int(round(n * 0.3))
    kinds = _balanced(rng, [1] * (n - n_two) + [2] * n_two, n) if n else []
    ones = [i for i, k in enumerate(kinds) if k == 1]
    colors = _balanced(rng, list(COLORS), len(ones))
    shapes = _balanced(rng, SHAPES, len(ones))
    poss = _balanced(rng, list(POSITIONS), len(ones))
    plan: list[dict] = [{} for _ in range(n)]
    for i, c, s, p in zip(ones, colors, shapes, poss):
        plan[i] = {"objects": [(s, c, p)]}
    twos = [i for i, k in enumerate(kinds) if k == 2]
    layouts = _balanced(rng, [("left", "right"), ("top", "bottom")], len(twos))
    for i, lay in zip(twos, layouts):
        c1, c2 = rng.choice(list(COLORS), 2, replace=False)
        s1, s2 = rng.choice(SHAPES, 2, replace=True)
        plan[i] = {"objects": [(str(s1), str(c1), lay[0]), (str(s2), str(c2), lay[1])]}
    return plan


def _make_image_caption(attrs, rng, path: Path):
    objs = attrs["objects"]
    r_lo, r_hi = (38, 48) if len(objs) == 1 else (32, 42)
    drawn = [(s, c, *_at_position(rng, p), rng.uniform(r_lo, r_hi)) for s, c, p in objs]
    _save_png(_image_scene(rng, drawn), path)
    if len(objs) == 1:
        s, c, p = objs[0]
        p0, p1, p2 = POSITION_PHRASES[p]
        refs = [f"a {c} {s} {p0}.", f"a {c} {s} {p1}.", f"{c} {s}, {p2}.",
                f"there is a {c} {s} {p0}."]
    else:
        (s1, c1, q1), (s2, c2, q2) = objs
        a, b = POSITION_PHRASES[q1], POSITION_PHRASES[q2]
        refs = [f"a {c1} {s1} {a[0]} and a {c2} {s2} {b[0]}.",
                f"a {c1} {s1} {a[1]} and a {c2} {s2} {b[1]}.",
                f"{c1} {s1}, {a[2]}; {c2} {s2}, {b[2]}.",
                f"there is a {c1} {s1} {a[0]} and a {c2} {s2} {b[0]}."]
    return "", refs[0], refs


def _plan_image_qa(rng, n):
    return [{"q": q, "a": a} for q, a in _qa_plan(rng, {
        "color": list(COLORS), "shape": list(SHAPES), "count": ["1", "2", "3"],
        "position": list(POSITIONS)}, n)]


def _make_image_qa(attrs, rng, path: Path):
    q, a = attrs["q"], attrs["a"]
    colors, shapes = list(COLORS), list(SHAPES)
    if q == "count":
        k = int(a)
        cells = rng.choice(9, k, replace=False)  # distinct cells of a 3x3 grid
        cell = IMAGE_SIZE / 3
        objs = []
        for c_ in cells:
            cx = (c_ % 3 + 0.5) * cell + rng.uniform(-5, 5)
            cy = (c_ // 3 + 0.5) * cell + rng.uniform(-5, 5)
            objs.append((str(rng.choice(shapes)), str(rng.choice(colors)), cx, cy,
                         rng.uniform(24, 31)))
    else:
        shape = a if q == "shape" else str(rng.choice(shapes))
        color = a if q == "color" else str(rng.choice(colors))
        pos = a if q == "position" else str(rng.choice(list(POSITIONS)))
        objs = [(shape, color, *_at_position(rng, pos), rng.uniform(36, 48))]
    _save_png(_image_scene(rng, objs), path)
    return QUESTIONS["synth_image_qa"][q], a, _answer_refs(a)


# ---------------------------------------------------------------------------- audio


def _tone(rng, pitch: str, pattern: str, beeps: int, sr=AUDIO_SR) -> np.ndarray:
    dur = rng.uniform(1.0, 2.0)
    n = int(round(dur * sr))
    t = np.arange(n, dtype=np.float64) / sr
    f = PITCHES[pitch] * math.exp(rng.uniform(-0.08, 0.08))
    amp = rng.uniform(0.35, 0.6)
    harm = rng.uniform(0.0, 0.25)  # a little timbre variation
    if pattern in ("rising", "falling"):
        f0, f1 = f / math.sqrt(2), f * math.sqrt(2)
        if pattern == "falling":
            f0, f1 = f1, f0
        k = math.log(f1 / f0)
        phase = 2 * math.pi * f0 * dur / k * (np.exp(k * t / dur) - 1.0)
    else:
        phase = 2 * math.pi * f * t
    x = np.sin(phase) + harm * np.sin(2 * phase)
    env = np.ones(n)
    fade = int(0.01 * sr)
    if pattern == "beeping":
        env[:] = 0.0
        period = dur / beeps
        blen = int(rng.uniform(0.10, 0.14) * sr)
        for j in range(beeps):
            s = int((j * period + 0.04) * sr)
            e = min(n, s + blen)
            env[s:e] = 1.0
            m = min(fade, (e - s) // 2)
            env[s:s + m] *= np.linspace(0, 1, m)
            env[e - m:e] *= np.linspace(1, 0, m)
    else:
        env[:fade] *= np.linspace(0, 1, fade)
        env[-fade:] *= np.linspace(1, 0, fade)
    x = amp * x / (1 + harm) * env
    snr_db = rng.uniform(18, 35)
    x = x + rng.normal(0, amp * 10 ** (-snr_db / 20), n)
    return np.clip(x, -1, 1).astype(np.float32)


def _save_wav(x: np.ndarray, path: Path, sr=AUDIO_SR):
    pcm = (np.clip(x, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm.tobytes())


def _plan_audio_caption(rng, n):
    patterns = _balanced(rng, PATTERNS, n)
    pitches = _balanced(rng, list(PITCHES), n)
    beeps = iter(_balanced(rng, [1, 2, 3, 4], sum(p == "beeping" for p in patterns)))
    return [{"pitch": pi, "pattern": pa, "beeps": next(beeps) if pa == "beeping" else 0}
            for pa, pi in zip(patterns, pitches)]


def _audio_caption_refs(pitch, pattern, beeps):
    p = pitch
    if pattern == "beeping":
        if beeps == 1:
            return [f"one {p} beep.", f"a {p} tone beeping once.",
                    f"a single short {p}-pitched beep.", f"{p} beep, once."]
        w, t = NUM_WORDS[beeps], TIMES_WORDS[beeps]
        return [f"{w} {p} beeps.", f"a {p} tone beeping {t}.",
                f"{w} short {p}-pitched beeps.", f"{p} beeps, {t}."]
    if pattern == "steady":
        return [f"a {p} steady tone.", f"a steady {p} tone.",
                f"a constant {p}-pitched tone.", f"{p} steady tone."]
    return [f"a {p} {pattern} tone.", f"a {p} tone {pattern} in pitch.",
            f"a {pattern} {p}-pitched tone.", f"{p} {pattern} tone."]


def _make_audio_caption(attrs, rng, path: Path):
    _save_wav(_tone(rng, attrs["pitch"], attrs["pattern"], attrs["beeps"]), path)
    refs = _audio_caption_refs(attrs["pitch"], attrs["pattern"], attrs["beeps"])
    return "", refs[0], refs


def _plan_audio_qa(rng, n):
    return [{"q": q, "a": a} for q, a in _qa_plan(rng, {
        "pitch": ["high", "low"], "beeping": ["yes", "no"], "count": ["1", "2", "3", "4"],
        "direction": ["rising", "falling"]}, n)]


def _make_audio_qa(attrs, rng, path: Path):
    q, a = attrs["q"], attrs["a"]
    pitch = str(rng.choice(list(PITCHES)))
    beeps = int(rng.integers(1, 5))
    pattern = str(rng.choice(PATTERNS))
    if q == "pitch":
        pitch = a
    elif q == "beeping":
        pattern = "beeping" if a == "yes" else str(rng.choice(["steady", "rising", "falling"]))
    elif q == "count":
        pattern, beeps = "beeping", int(a)
    elif q == "direction":
        pattern = a
    _save_wav(_tone(rng, pitch, pattern, beeps), path)
    return QUESTIONS["synth_audio_qa"][q], a, _answer_refs(a)


# ---------------------------------------------------------------------------- video

_H264 = None


def _video_codec() -> str:
    global _H264
    if _H264 is None:
        import av

        _H264 = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    return _H264


def _video_frames(rng, shape: str, color: str, direction: str) -> list[np.ndarray]:
    size = int(rng.choice(VIDEO_SIZES))
    r = size * rng.uniform(0.13, 0.17)
    bg = _background(rng)
    fill = _jitter_color(rng, COLORS[color])
    trail = tuple(int(round(0.65 * b + 0.35 * c)) for b, c in zip(bg, fill))
    start, end = rng.uniform(0.17, 0.24), rng.uniform(0.76, 0.83)
    if direction in ("left", "up"):
        start, end = 1 - start, 1 - end
    cross = rng.uniform(0.32, 0.68) * size
    frames = []
    for t in range(VIDEO_FRAMES):
        along = lambda k: (start + (end - start) * k / (VIDEO_FRAMES - 1)) * size  # noqa: E731
        img = Image.new("RGB", (size, size), bg)
        draw = ImageDraw.Draw(img)
        for k, col in ((t - 1, trail), (t, fill)):  # faint motion trail, then the shape
            if k < 0:
                continue
            cx, cy = (along(k), cross) if direction in ("left", "right") else (cross, along(k))
            _draw_shape(draw, shape, cx, cy, r, col)
        frames.append(np.asarray(img))
    return frames


def _yuv420p(rgb: np.ndarray) -> np.ndarray:
    """RGB [H, W, 3] -> the planar YUV 4:2:0 layout of PyAV's from_ndarray [H * 3/2, W] (BT.601, limited
    range). Converting here rather than in FFmpeg's swscale keeps the bytes identical from run to run:
    swscale's result depended on the state of the process (seen as different files for the same frames)."""
    x = rgb.astype(np.float64)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = 16 + (65.738 * r + 129.057 * g + 25.064 * b) / 256
    u = 128 + (-37.945 * r - 74.494 * g + 112.439 * b) / 256
    v = 128 + (112.439 * r - 94.154 * g - 18.285 * b) / 256
    h, w = y.shape
    sub = lambda c: c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)).reshape(h // 4, w)  # noqa: E731
    return np.clip(np.rint(np.concatenate([y, sub(u), sub(v)])), 0, 255).astype(np.uint8)


def _save_mp4(frames: list[np.ndarray], path: Path, fps=VIDEO_FPS, sound: np.ndarray | None = None):
    """H.264 (or MPEG-4 part 2) video; with `sound`, also a mono track at AUDIO_SR in Apple Lossless (ALAC):
    integer coding gives the same bytes on every run, which FFmpeg's AAC encoder does not (its float code
    depends on buffer alignment)."""
    import av

    h, w = frames[0].shape[:2]
    codec = _video_codec()
    with av.open(str(path), "w", format="mp4", options={"fflags": "+bitexact"}) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"crf": "16", "preset": "veryfast"} if codec == "libx264" else {"qscale": "2"}
        s.codec_context.thread_count = 1  # deterministic bytes, no thread start-up cost
        if sound is not None:  # every stream must exist before the first packet is written
            a = c.add_stream("alac", rate=AUDIO_SR)
            a.layout, a.format = "mono", "s16p"
            a.codec_context.thread_count = 1
        for fr in frames:
            for pkt in s.encode(av.VideoFrame.from_ndarray(_yuv420p(fr), format="yuv420p")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
        if sound is not None:
            pcm = (np.clip(sound, -1, 1) * 32767).astype(np.int16)[None]
            frame = av.AudioFrame.from_ndarray(pcm, format="s16p", layout="mono")
            frame.sample_rate = AUDIO_SR
            for pkt in [*a.encode(frame), *a.encode(None)]:
                c.mux(pkt)


def _plan_video_caption(rng, n):
    return [{"shape": s, "color": c, "direction": d} for s, c, d in zip(
        _balanced(rng, SHAPES, n), _balanced(rng, list(COLORS), n), _balanced(rng, DIRECTIONS, n))]


def _make_video_caption(attrs, rng, path: Path):
    s, c, d = attrs["shape"], attrs["color"], attrs["direction"]
    _save_mp4(_video_frames(rng, s, c, d), path)
    d0, d1, d2, d3 = DIRECTION_PHRASES[d]
    refs = [f"a {c} {s} {d0}.", f"a {c} {s} {d1}.", f"a {c} {s} {d2}.", f"{c} {s}, {d3}."]
    return "", refs[0], refs


def _plan_video_qa(rng, n):
    return [{"q": q, "a": a} for q, a in _qa_plan(rng, {
        "direction": list(DIRECTIONS), "color": list(COLORS), "shape": list(SHAPES)}, n)]


def _make_video_qa(attrs, rng, path: Path):
    q, a = attrs["q"], attrs["a"]
    shape = a if q == "shape" else str(rng.choice(SHAPES))
    color = a if q == "color" else str(rng.choice(list(COLORS)))
    direction = a if q == "direction" else str(rng.choice(DIRECTIONS))
    _save_mp4(_video_frames(rng, shape, color, direction), path)
    return QUESTIONS["synth_video_qa"][q], a, _answer_refs(a)


# ---------------------------------------------------------------------------- audio-visual


def _plan_av_caption(rng, n):
    return [{"shape": s, "color": c, "direction": d, "pitch": p, "pattern": pa} for s, c, d, p, pa in zip(
        _balanced(rng, SHAPES, n), _balanced(rng, list(COLORS), n), _balanced(rng, DIRECTIONS, n),
        _balanced(rng, list(PITCHES), n), _balanced(rng, PATTERNS, n))]


def _make_av_caption(attrs, rng, path: Path):
    """The moving shape of synth_video_caption with a tone of synth_audio_caption as its sound track; the
    caption names both, so neither medium alone gives the whole answer."""
    s, c, d, p, pa = attrs["shape"], attrs["color"], attrs["direction"], attrs["pitch"], attrs["pattern"]
    frames = _video_frames(rng, s, c, d)
    _save_mp4(frames, path, sound=_tone(rng, p, pa, int(rng.integers(2, 5))))
    d0, d1, _, d3 = DIRECTION_PHRASES[d]
    refs = [f"a {c} {s} {d0} with a {p} {pa} sound.", f"a {c} {s} {d1}, sounding a {p} {pa} tone.",
            f"a {p} {pa} tone while a {c} {s} is {d0}.", f"{c} {s}, {d3}, {p} {pa} sound."]
    return "", refs[0], refs


_GENERATORS: dict[str, tuple[Callable, Callable, str]] = {
    "synth_image_caption": (_plan_image_caption, _make_image_caption, "png"),
    "synth_image_qa": (_plan_image_qa, _make_image_qa, "png"),
    "synth_audio_caption": (_plan_audio_caption, _make_audio_caption, "wav"),
    "synth_audio_qa": (_plan_audio_qa, _make_audio_qa, "wav"),
    "synth_video_caption": (_plan_video_caption, _make_video_caption, "mp4"),
    "synth_video_qa": (_plan_video_qa, _make_video_qa, "mp4"),
    "synth_av_caption": (_plan_av_caption, _make_av_caption, "mp4"),
}


# ---------------------------------------------------------------------------- driver


def _check_args(seed, counts, tasks) -> list[str]:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed: must be a non-negative integer, got {seed!r}")
    for split, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"n_{split}: must be a non-negative integer, got {n!r}")
    if tasks is None:
        return list(SYNTH_TASKS)
    if isinstance(tasks, str):
        tasks = [tasks]
    tasks = list(tasks)
    bad = [t for t in tasks if t not in SYNTH_TASKS]
    if bad:
        raise ConfigError(f"tasks: unknown synthetic task(s) {', '.join(map(str, bad))} "
                          f"(valid: {', '.join(SYNTH_TASKS)})")
    if not tasks:
        raise ConfigError("tasks: empty list (give None for all synthetic tasks)")
    return [t for t in SYNTH_TASKS if t in tasks]  # canonical order, no duplicates


def _read_manifest(out_dir: Path) -> dict | None:
    try:
        with open(out_dir / "manifest.json", encoding="utf-8") as f:
            m = json.load(f)
        return m if isinstance(m, dict) and m.get("name") == GENERATOR_NAME else None
    except (OSError, ValueError):
        return None


def _write_text_atomic(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    os.replace(tmp, path)


def _generate_task(out_dir: Path, task: str, seed: int, counts: dict[str, int]):
    plan_fn, make_fn, ext = _GENERATORS[task]
    spec = get_task(task)
    tk = _task_key(task)
    media_root = out_dir / "media" / task
    task_dir = out_dir / task
    for d in (media_root, task_dir):
        if d.exists():
            shutil.rmtree(d)
    files = {}
    for si, split in enumerate(SPLITS):
        n = counts[split]
        (media_root / split).mkdir(parents=True, exist_ok=True)
        task_dir.mkdir(parents=True, exist_ok=True)
        plan = plan_fn(np.random.default_rng([seed, tk, si]), n)
        lines = []
        for i, attrs in enumerate(plan):
            rel = f"media/{task}/{split}/{i:05d}.{ext}"
            rng = np.random.default_rng([seed, tk, si, i])
            instruction, target, refs = make_fn(attrs, rng, out_dir / rel)
            row = {"id": f"{task}-{split}-{i:05d}", "task": task, "modality": spec.modality,
                   "task_type": spec.task_type, "media": rel, "instruction": instruction,
                   "target": target, "references": refs}
            validate_sample(row, f"{GENERATOR_NAME}:{task}/{split}")
            lines.append(json.dumps(row, ensure_ascii=False))
        path = task_dir / f"{split}.jsonl"
        _write_text_atomic(path, "".join(line + "\n" for line in lines))
        files[split] = {"path": f"{task}/{split}.jsonl", "rows": n}
    return files


def generate_synth(out_dir, seed: int = 0, n_train: int = DEFAULT_COUNTS["train"],
                   n_val: int = DEFAULT_COUNTS["val"], n_test: int = DEFAULT_COUNTS["test"],
                   tasks: Iterable[str] | None = None) -> dict:
    """Generate the micl-synth benchmark under ``out_dir``.

    Writes ``media/<task>/<split>/NNNNN.{png,wav,mp4}``, ``<task>/{train,val,test}.jsonl``
    (schema rows, media paths relative to ``out_dir``) and ``manifest.json``.
    Every task/split/sample draws from its own RNG keyed by (seed, task, split, index),
    so the output does not depend on which other tasks are generated.

    Idempotent: when ``manifest.json`` already records this seed, these counts and this
    generator version and lists the requested tasks (and their jsonl files exist),
    nothing is written. Tasks missing from a matching manifest are added; a different
    seed/count/version regenerates the requested tasks (their old files are removed).

    Returns the manifest dict plus ``out_dir``, ``generated`` (tasks written by this
    call) and ``seconds``.
    """
    t0 = time.perf_counter()
    counts = {"train": n_train, "val": n_val, "test": n_test}
    wanted = _check_args(seed, counts, tasks)
    out_dir = Path(out_dir)
    old = _read_manifest(out_dir)
    same = (old is not None and old.get("generator_version") == GENERATOR_VERSION
            and old.get("seed") == seed and old.get("counts") == counts)
    have = set(old.get("tasks", [])) if same else set()
    have = {t for t in have if all((out_dir / t / f"{s}.jsonl").is_file() for s in SPLITS)}
    todo = [t for t in wanted if t not in have]
    if not todo:
        result = dict(old)
        result.update(out_dir=str(out_dir), generated=[],
                      seconds=round(time.perf_counter() - t0, 4))
        return result

    out_dir.mkdir(parents=True, exist_ok=True)
    if not same and (out_dir / "manifest.json").exists():
        # the old manifest describes files we are about to replace
        (out_dir / "manifest.json").unlink()
    files = dict(old.get("files", {})) if same else {}
    files = {t: v for t, v in files.items() if t in have}
    for task in todo:
        files[task] = _generate_task(out_dir, task, seed, counts)
    all_tasks = [t for t in SYNTH_TASKS if t in files]
    manifest = {
        "name": GENERATOR_NAME,
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "counts": counts,
        "tasks": all_tasks,
        "files": {t: files[t] for t in all_tasks},
        "media": {"image_size": IMAGE_SIZE, "audio_sampling_rate": AUDIO_SR,
                  "video_frames": VIDEO_FRAMES, "video_fps": VIDEO_FPS,
                  "video_sizes": list(VIDEO_SIZES), "video_codec": _video_codec()
                  if any(t.startswith(("synth_video", "synth_av")) for t in all_tasks) else None},
    }
    _write_text_atomic(out_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    result = dict(manifest)
    result.update(out_dir=str(out_dir), generated=todo,
                  seconds=round(time.perf_counter() - t0, 4))
    return result
