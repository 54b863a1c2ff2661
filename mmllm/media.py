"""Decoding of media files into one canonical form: RGB images, mono float32 audio, normalized text.

Every failure raises `MediaError` with a short reason; callers attach the record and column.
"""

from __future__ import annotations

import io
import math
import os
import stat
import unicodedata
from typing import Any
from pathlib import Path

import numpy as np

MAX_IMAGE_PIXELS = 89_478_485  # PIL's own default bomb limit (~ 0.25 GiB RGBA), enforced as an error
# an encoder scales the short side to its input size: a 4000x1 strip would become 896000x224. Longer images are
# refused, so the resized image holds at most MAX_ASPECT x size^2 pixels
MAX_ASPECT = 50
MB = 1 << 20


class MediaError(ValueError):
    """A media file that cannot be used, with the reason."""


_KINDS = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


SHOWN = 200  # characters of a path an error line quotes


def shown(path: Any) -> str:
    """A path as error lines quote it: at most SHOWN characters (a data: URI or a pasted blob is not echoed)."""
    text = str(path)
    return text if len(text) <= SHOWN else f"{text[:SHOWN]}... ({len(text)} characters)"


def check_file(path: str | Path, max_mb: float | None = None) -> int:
    """Size in bytes of a media path that is safe to open: a regular, non-empty file (after following
    symlinks) of at most `max_mb` MB. Checked with stat only, so a named pipe or a device never blocks."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MediaError(f"file not found: {shown(path)}" + (" (broken symlink)" if path.is_symlink() else "")) \
            from None
    except (OSError, ValueError) as e:  # permission, name too long, embedded NUL byte, symlink loop ...
        raise MediaError(f"cannot open ({getattr(e, 'strerror', None) or e}): {shown(path)}") from None
    if stat.S_ISDIR(st.st_mode):
        raise MediaError(f"{shown(path)} is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "a special file")
        raise MediaError(f"not a regular file ({kind}): {shown(path)}")
    if max_mb is not None and st.st_size > max_mb * MB:
        raise MediaError(f"file too large ({st.st_size / MB:.1f} MB > --max-file-mb {max_mb:g}): {shown(path)}")
    if st.st_size == 0:
        raise MediaError(f"empty file: {shown(path)}")
    return st.st_size


def check_bytes(data: bytes, max_mb: float | None = None) -> None:
    """The same size limit for media given inline as bytes."""
    if max_mb is not None and len(data) > max_mb * MB:
        raise MediaError(f"media bytes too large ({len(data) / MB:.1f} MB > --max-file-mb {max_mb:g})")


def _read_bytes(path: Path) -> bytes:
    check_file(path)
    data = path.read_bytes()
    if not data:
        raise MediaError(f"empty file: {path}")
    return data


def load_image(source: str | Path | bytes, min_side: int | None = None):
    """An RGB PIL image (from a path or raw bytes): EXIF orientation applied, first frame of animations,
    any mode converted to RGB.

    `min_side`: the short side the consumer (an encoder) scales to. Then the image is downsized while decoding
    (JPEG `draft`, then `reduce` by a whole factor) to a short side between min_side and 2 x min_side, and an
    image longer than MAX_ASPECT:1 is refused, so memory per image is bounded whatever its size or shape."""
    import warnings

    from PIL import Image, ImageOps

    path = Path(source) if not isinstance(source, bytes) else Path("<bytes>")
    data = source if isinstance(source, bytes) else _read_bytes(path)
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.seek(0)
            if min_side:
                check_aspect(img.size, path)
                img.draft("RGB", (min_side, min_side))  # JPEG: decoded at 1/2, 1/4 or 1/8 scale, short side >= min_side
            img.load()
            img = ImageOps.exif_transpose(_shrink(img, min_side))
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise MediaError(f"image too large (decompression bomb guard, > {MAX_IMAGE_PIXELS} pixels): {path}") from None
    except Image.UnidentifiedImageError:
        raise MediaError(f"not an image (unrecognized format): {path}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise MediaError(f"corrupt image ({str(e).splitlines()[0]}): {path}") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / 32-bit grey: scale to 8 bits
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return _shrink(img.convert("RGB"), min_side)


def check_aspect(size: tuple[int, int], path: Path) -> None:
    w, h = size
    if max(w, h) > MAX_ASPECT * max(1, min(w, h)):
        raise MediaError(f"image {w}x{h} is too elongated (aspect ratio over {MAX_ASPECT}:1; an encoder would scale "
                         f"it to {round(max(w, h) / max(1, min(w, h)))}x its input size): crop it: {path}")


def _shrink(img, min_side: int | None):
    """`img` reduced by the largest whole factor that keeps its short side >= min_side (box filter; modes reduce
    does not support are left for the call after conversion to RGB)."""
    factor = min(img.size) // min_side if min_side else 1
    if factor < 2:
        return img
    try:
        return img.reduce(factor)
    except ValueError:
        return img


MAX_AUDIO_PEAK = 1000.0  # samples are full scale at +-1; float WAV/FLAC may exceed it, not by this much


def load_audio(source: str | Path | bytes, sample_rate: int, max_seconds: float | None = None) -> np.ndarray:
    """Mono float32 samples at `sample_rate` (from a path or raw bytes), trimmed to `max_seconds`
    (reading no further than needed)."""
    import soundfile as sf

    if isinstance(source, bytes):
        path, handle = Path("<bytes>"), io.BytesIO(source)
        if not source:
            raise MediaError("empty audio bytes")
    else:
        path = Path(source)
        check_file(path)
        handle = str(path)
    try:
        with sf.SoundFile(handle) as f:
            src_rate = f.samplerate
            frames = f.frames if max_seconds is None else min(f.frames, int(max_seconds * src_rate))
            audio = f.read(frames, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise MediaError(f"cannot decode audio ({str(e).splitlines()[0]}): {path}") from None
    if audio.shape[0] == 0:
        raise MediaError(f"audio has no samples: {path}")
    audio = audio.mean(axis=1)
    if not np.isfinite(audio).all():
        raise MediaError(f"audio contains NaN or Inf samples: {path}")
    peak = float(np.abs(audio).max())
    if peak > MAX_AUDIO_PEAK:  # float files can hold any value; the log-mel of 1e30 overflows to NaN features
        raise MediaError(f"audio samples reach {peak:.3g}, beyond {MAX_AUDIO_PEAK:g} x full scale (+-1): {path}")
    if src_rate != sample_rate:
        audio = resample(audio, src_rate, sample_rate)
    return np.ascontiguousarray(audio, dtype=np.float32)


def resample(audio: np.ndarray, src_rate: int, rate: int) -> np.ndarray:
    """librosa.resample(res_type="soxr_hq"), the same samples, by calling soxr (librosa's own resampler) directly:
    librosa's first call in a process costs ~2 s (its lazy imports), most of prepare's decoding on sample_data."""
    try:
        import soxr
    except ImportError:  # librosa's dependency; its own path as a fallback
        import librosa

        return librosa.resample(audio, orig_sr=src_rate, target_sr=rate, res_type="soxr_hq")
    out = soxr.resample(audio, src_rate, rate, quality="HQ")
    n = math.ceil(len(audio) * (float(rate) / src_rate))  # librosa's length: zero-padded or cut to it
    return out[:n] if len(out) >= n else np.pad(out, (0, n - len(out)))


def normalize_text(text: object) -> str:
    """Unicode NFC, BOM removed, whitespace collapsed. None/NaN -> ''."""
    if text is None or (isinstance(text, float) and np.isnan(text)):
        return ""
    s = unicodedata.normalize("NFC", str(text)).replace("\ufeff", "")
    return " ".join(s.split())
