"""Decoding of media files into one canonical form: RGB images, mono float32 audio, normalized text.

Every failure raises `MediaError` with a short reason; callers attach the record and column.
"""

from __future__ import annotations

import io
import unicodedata
from pathlib import Path

import numpy as np

MAX_IMAGE_PIXELS = 89_478_485  # PIL's own default bomb limit (~ 0.25 GiB RGBA), enforced as an error


class MediaError(ValueError):
    """A media file that cannot be used, with the reason."""


def _read_bytes(path: Path) -> bytes:
    if path.is_dir():
        raise MediaError(f"{path} is a folder, not a file")
    if not path.exists():
        raise MediaError(f"file not found: {path}" + (" (broken symlink)" if path.is_symlink() else ""))
    data = path.read_bytes()
    if not data:
        raise MediaError(f"empty file: {path}")
    return data


def load_image(source: str | Path | bytes):
    """An RGB PIL image (from a path or raw bytes): EXIF orientation applied, first frame of animations,
    any mode converted to RGB."""
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
            img.load()
            img = ImageOps.exif_transpose(img)
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
    return img.convert("RGB")


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
        if path.is_dir() or not path.exists():
            _read_bytes(path)
        if path.stat().st_size == 0:
            raise MediaError(f"empty file: {path}")
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
    if src_rate != sample_rate:
        import librosa

        audio = librosa.resample(audio, orig_sr=src_rate, target_sr=sample_rate, res_type="soxr_hq")
    return np.ascontiguousarray(audio, dtype=np.float32)


def normalize_text(text: object) -> str:
    """Unicode NFC, BOM removed, whitespace collapsed. None/NaN -> ''."""
    if text is None or (isinstance(text, float) and np.isnan(text)):
        return ""
    s = unicodedata.normalize("NFC", str(text)).replace("\ufeff", "")
    return " ".join(s.split())
