"""The audio modality: mono float32 clips at the encoder's rate, encoded by a frozen speech model (Whisper tiny.en
by default, or librosa log-mel / MFCC statistics); --transcribe turns its speech into text."""

from __future__ import annotations

import math
import os
from typing import Any

from mmllm.modalities.base import Modality, Option, is_array, passes

EXTENSIONS = frozenset({".wav", ".flac", ".ogg", ".mp3", ".oga", ".aiff", ".aif"})
MAX_SECONDS = 600.0  # longest audio read (prepare, and any checkpoint's preprocessing)
MAX_TOKENS_PER_SECOND = 50  # --audio-tokens-per-second: the encoders' own frame rate (whisper: 50 a second)
# what --augment does to a clip (gain, white noise, circular shift)
AUGMENT = {"gain_db": 6.0, "snr_db": 30.0, "shift_s": 0.1}
TYPES = "a path, bytes, (array, sampling_rate) or {\"array\": ..., \"sampling_rate\": ...}"
MAX_SAMPLING_RATE = 768_000  # the highest rate of common audio hardware


def augment_audio(clip: Any, rng: Any, sample_rate: int, p: dict = AUGMENT) -> Any:
    """Gain, white noise at a fixed SNR, circular time shift (`AUGMENT`: --augment's help)."""
    import numpy as np

    clip = clip * np.float32(10 ** (rng.uniform(-p["gain_db"], p["gain_db"]) / 20))
    power = float(np.mean(clip ** 2)) or 1e-8
    clip = clip + rng.normal(0, np.sqrt(power / 10 ** (p["snr_db"] / 10)), clip.shape).astype(np.float32)
    most = int(sample_rate * p["shift_s"])
    shift = int(rng.integers(-most, most + 1))
    return np.roll(clip, shift).astype(np.float32)


def audio_bytes(value: Any) -> Any:
    import io

    if isinstance(value, dict) and "array" in value:
        samples, rate = value["array"], value.get("sampling_rate")
    elif isinstance(value, (tuple, list)) and len(value) == 2 and not isinstance(value[1], (list, tuple)) \
            and not passes(value[0]):  # (path, path) is two files, not (samples, rate)
        samples, rate = value
    elif passes(value):
        return os.fspath(value) if isinstance(value, os.PathLike) else value
    elif is_array(value):
        raise TypeError("an audio array needs its sampling rate: pass (array, sampling_rate) or "
                        "{\"array\": array, \"sampling_rate\": rate}")
    else:
        raise TypeError(f"audio is {TYPES}, not a {type(value).__name__}")
    import numpy as np
    import soundfile as sf

    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer, np.floating)) or not rate > 0 \
            or not rate <= MAX_SAMPLING_RATE or rate != int(rate):
        raise ValueError(f"the sampling rate is a whole number of samples per second from 1 to {MAX_SAMPLING_RATE} "
                         "(e.g. 16000)")
    arr = np.asarray(samples)
    if arr.dtype.kind not in "fiu" or arr.size == 0:  # fiu: float, signed, unsigned
        raise ValueError(f"audio samples are a non-empty array of numbers, got dtype {arr.dtype}, {arr.size} values")
    if arr.ndim == 2 and arr.shape[0] < arr.shape[1] and arr.shape[0] <= 8:  # (channels, samples): librosa's order
        arr = arr.T
    if arr.ndim not in (1, 2):
        raise ValueError(f"audio samples are (samples,) or (samples, channels), got shape {arr.shape}")
    if arr.dtype.kind == "u":
        raise ValueError(f"audio samples are float (-1 to 1) or signed integers, not {arr.dtype}")
    if arr.dtype.kind == "i":  # full scale as soundfile reads PCM: int16 / 32768
        arr = arr.astype(np.float64) / -float(np.iinfo(arr.dtype).min)
    elif not np.isfinite(arr).all():
        raise ValueError("audio samples have NaN or Inf values")
    buf = io.BytesIO()
    sf.write(buf, np.ascontiguousarray(arr, dtype=np.float32), int(rate), format="WAV", subtype="FLOAT")
    return buf.getvalue()




class Audio(Modality):
    name = "audio"
    columns = ("audio", "audio_path", "wav", "audio_file", "sound", "speech")
    extensions = EXTENSIONS
    fixed = {"audio": "mono float32"}
    default_model = "whisper-tiny.en"
    model_help = "Audio encoder: alias (also logmel, mfcc), local folder or hub id."
    options = (Option("max_audio_seconds", 30.0, "Trim audio to this many seconds.", low=0, high=MAX_SECONDS),
               Option("audio_tokens_per_second", 0, "With --sequence-features: store the audio as N vectors per "
                      "second of the clip (its encoder frames average-pooled in time; up to N x --max-audio-seconds, "
                      "zero rows after the clip's end), which generation's --media-tokens sequence feeds as decoder "
                      "tokens. 0: 16 vectors per clip whatever its length.", low=-1, high=MAX_TOKENS_PER_SECOND))
    augment_help = ("Audio: gain within +-{gain_db:g} dB, white noise at {snr_db:g} dB SNR, shifted circularly by up "
                    "to +-{shift_s:g} s.").format(**AUGMENT)
    transcribable = True

    def load_encoder(self, name: str, trust_remote_code: bool = False, precision: str = "fp32") -> Any:
        from mmllm.encoders import AudioEncoder

        return AudioEncoder(name, trust_remote_code=trust_remote_code, precision=precision)

    def decode(self, media: Any, encoder: Any, pre: Any) -> Any:
        from mmllm.media import load_audio

        return load_audio(media, encoder.sample_rate, pre.option("max_audio_seconds"))

    def augment(self, decoded: Any, rng: Any, encoder: Any) -> Any:
        return augment_audio(decoded, rng, encoder.sample_rate)

    def key_parts(self, pre: Any) -> dict:
        parts = {"max_seconds": pre.option("max_audio_seconds")}
        return self.with_rate(parts, pre)

    def with_rate(self, parts: dict, pre: Any) -> dict:
        if pre.option("audio_tokens_per_second"):
            parts["tokens_per_second"] = pre.option("audio_tokens_per_second")
        return parts

    def sequence_length(self, pre: Any) -> int:
        rate = pre.option("audio_tokens_per_second")
        return math.ceil(rate * self.longest(pre)) if rate else self.seq_len

    def longest(self, pre: Any) -> float:
        """Seconds of a clip that are read."""
        return float(pre.option("max_audio_seconds"))

    def ragged(self, pre: Any) -> bool:
        return bool(pre.option("audio_tokens_per_second"))

    def stored_sequence(self, seq: Any, decoded: Any, encoder: Any, pre: Any) -> Any:
        """--audio-tokens-per-second N: ceil(N x the clip's seconds) vectors (its frames pooled in time), then zero
        rows up to N x --max-audio-seconds."""
        import numpy as np

        from mmllm.pooling import pool_sequence

        rate = pre.option("audio_tokens_per_second")
        if not rate:
            return super().stored_sequence(seq, decoded, encoder, pre)
        slots = self.sequence_length(pre)
        n = min(slots, max(1, math.ceil(rate * len(decoded) / encoder.sample_rate)))
        out = np.zeros((slots, seq.shape[-1]), np.float32)
        out[:n] = pool_sequence(seq, n)
        return out

    def sample(self) -> Any:
        import numpy as np

        t = np.arange(16000, dtype=np.float32) / 16000
        return 0.1 * np.sin(2 * np.pi * 440 * t), 16000

    def from_memory(self, value: Any) -> Any:
        return audio_bytes(value)
