"""The video modality: K frames sampled uniformly over the clip, each encoded by the image encoder; the soundtrack
is the record's audio when it has none (the audio encoder, and --transcribe, read it), else its own part-only
input `video_audio` (the same audio encoder, loaded once; not transcribed).

Decoded with PyAV (`av` from PyPI bundles its own FFmpeg libraries). A file is opened with the demuxer its first
bytes name (MP4/MOV, Matroska/WebM, AVI, GIF), never one FFmpeg guesses, so a playlist or a concat script posing
as a video can never make FFmpeg open another file or a URL. Stated limits: the first --max-video-seconds are read
(a 10-hour file costs what its first seconds cost), at most MAX_PIXELS per frame, MAX_DECODED frames and
MAX_DECODED_PIXELS pixels decoded, and --max-file-mb as for every file. Times count from the stream's first
timestamp.
"""

from __future__ import annotations

import io
from typing import Any

from mmllm.modalities.base import Modality, Option
from mmllm.modalities.audio import Audio
from mmllm.modalities.image import Image

EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi"})  # animated GIF: given in a video column
MAX_SECONDS = 600.0
MAX_FRAMES = 64  # --video-frames
MAX_PIXELS = 8192 * 4320  # 8K: larger frames are refused before any is decoded
MAX_DECODED = 20_000  # frames decoded per file, whatever its frame rate claims
# pixels decoded per file before its last sampled time: 30 s of 4K at 30 fps; ~4 s of decoding on one core (tiny
# skip-frames at 8K cost ~0.5 ns per pixel), so no file holds a decoder (or serve's worker) longer than that
MAX_DECODED_PIXELS = 8_000_000_000
FRAME_BATCH = 32  # frames per image-encoder forward
TYPES = "a path or the bytes of a video file"


def container_format(head: bytes) -> str | None:
    """PyAV's demuxer for a file starting with `head` (its first 16 bytes), or None when it is not a video file."""
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"):
        return "mov"  # MP4, MOV, M4V, 3GP
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"  # MKV, WebM
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    return None


def open_video(media: str | bytes) -> Any:
    """A PyAV input container of a path or bytes, with its demuxer chosen from the first bytes."""
    import av
    import av.logging

    from mmllm.media import MediaError, check_file

    av.logging.set_level(av.logging.PANIC)  # FFmpeg's own warnings would be lines with no record named
    if isinstance(media, bytes):
        handle, name = io.BytesIO(media), "<bytes>"
    else:
        check_file(media)
        handle, name = open(media, "rb"), media
    fmt = container_format(handle.read(16))
    handle.seek(0)
    if fmt is None:
        handle.close()
        raise MediaError(f"not a video file (MP4/MOV, MKV/WebM, AVI or GIF): {name}")
    try:
        return av.open(handle, mode="r", format=fmt, options={"enable_drefs": "0"})
    except av.error.EOFError:
        handle.close()
        raise MediaError(f"no video frames (the file ends before its first frame): {name}") from None
    except Exception as e:  # noqa: BLE001 - av.error.InvalidDataError and its kin: a damaged file
        handle.close()
        raise MediaError(f"not a readable video ({_reason(e)}): {name}") from None


def _reason(e: Exception) -> str:
    """FFmpeg's reason without the file name PyAV appends to it."""
    return (getattr(e, "strerror", None) or str(e).split(":")[0] or type(e).__name__)[:100]


def read_frames(media: str | bytes, k: int, max_seconds: float, min_side: int | None = None) -> list:
    """`k` RGB PIL frames at the centres of k equal parts of the first `max_seconds` (or of the whole clip when
    shorter): the last decoded frame at or before each time. Short clips repeat frames to give k."""
    from mmllm.media import MediaError

    name = media if isinstance(media, str) else "<bytes>"
    with open_video(media) as container:
        if not container.streams.video:
            if container.streams.audio:
                raise MediaError(f"no video stream (give an audio-only file as audio): {name}")
            raise MediaError(f"not a readable video (no stream found in it): {name}")
        stream = container.streams.video[0]
        if stream.codec_context is None:
            raise MediaError(f"unsupported video codec (no decoder for it in PyAV's FFmpeg): {name}")
        width, height = stream.codec_context.width or 0, stream.codec_context.height or 0
        if width * height > MAX_PIXELS:
            raise MediaError(f"video frames too large ({width}x{height} > {MAX_PIXELS} pixels): {name}")
        length = _seconds(container, stream)
        span = min(length, max_seconds) if length else max_seconds
        times = [(i + 0.5) * span / k for i in range(k)]
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None and stream.time_base \
            else 0.0  # times count from the stream's first timestamp, which need not be 0
        picked: list = [None] * k  # per target time: the last frame at or before it (else the first after it)
        decoded = pixels = 0
        try:
            for frame in container.decode(stream):
                decoded += 1
                pixels += frame.width * frame.height
                if frame.width * frame.height > MAX_PIXELS:
                    raise MediaError(f"video frames too large ({frame.width}x{frame.height} > {MAX_PIXELS} "
                                     f"pixels): {name}")
                if pixels > MAX_DECODED_PIXELS:
                    raise MediaError(f"too much to decode: {decoded} frames of {frame.width}x{frame.height} reach "
                                     f"the limit of {MAX_DECODED_PIXELS:.0e} decoded pixels before the sampled "
                                     f"times (lower --max-video-seconds): {name}")
                t = float(frame.time) - start if frame.time is not None else \
                    decoded / float(stream.average_rate or 25)
                if (t > times[-1] and picked[-1] is not None) or decoded > MAX_DECODED:
                    break
                for i, target in enumerate(times):
                    if t <= target or picked[i] is None:
                        picked[i] = frame
        except MediaError:
            raise
        except Exception as e:  # noqa: BLE001 - a truncated or damaged stream, an undecodable codec
            if picked[0] is None:
                raise MediaError(f"cannot decode the video stream ({_reason(e)}): {name}") from None
        if picked[0] is None:
            raise MediaError(f"no video frames could be decoded: {name}")
        picked = [f if f is not None else picked[0] for f in picked]  # a damaged tail: the frames decoded
        images = [_image(f, min_side) for f in picked]
    return images


def _seconds(container: Any, stream: Any) -> float:
    """The clip's length in seconds from the container or the stream (0: unknown)."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:  # Matroska's segment duration runs to the last timestamp: from the first one on
        start = container.start_time or 0
        return (container.duration - start if 0 < start < container.duration else container.duration) / 1_000_000
    return 0.0


def _image(frame: Any, min_side: int | None):
    img = frame.to_image()  # RGB
    if min_side and min(img.size) > 2 * min_side:  # bounded memory, as load_image downsizes large images
        scale = 2 * min_side / min(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
    return img


def read_soundtrack(media: str | bytes, sample_rate: int, max_seconds: float) -> Any:
    """The first audio stream as mono float32 at `sample_rate`, trimmed to `max_seconds`; None: the file has none
    (or its soundtrack cannot be decoded, which leaves the video usable)."""
    import av
    import numpy as np

    with open_video(media) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        chunks, total, most = [], 0, int(max_seconds * sample_rate)
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                    total += chunks[-1].size
                if total >= most:
                    break
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
        except Exception:  # noqa: BLE001 - a damaged soundtrack: the frames still count
            pass
    if not chunks:
        return None
    clip = np.concatenate(chunks)[:most].astype(np.float32)
    return clip if clip.size and np.isfinite(clip).all() else None


class VideoEncoder:
    """The image encoder applied to each sampled frame: pooled = the mean of the frame vectors, sequence = the
    K frame vectors in time order (what attention / transformer fusion reads to see motion)."""

    def __init__(self, image_encoder: Any):
        self.image = image_encoder
        self.name, self.identity, self.dim = image_encoder.name, image_encoder.identity, image_encoder.dim
        self.precision, self.image_size = image_encoder.precision, image_encoder.image_size

    def encode(self, clips: list[list]) -> tuple[Any, list]:
        import numpy as np

        flat = [img for clip in clips for img in clip]
        vectors = []
        for b in range(0, len(flat), FRAME_BATCH):
            pooled, _ = self.image.encode(flat[b:b + FRAME_BATCH])
            vectors.append(pooled)
        frames = np.concatenate(vectors).reshape(len(clips), -1, self.dim)
        return frames.mean(1), list(frames)

    @property
    def runtime(self) -> str:
        return self.image.runtime

    def describe(self) -> dict:
        inner = {k: v for k, v in self.image.describe().items() if k != "seq_len"}
        return {**inner, "preprocessing": {**inner["preprocessing"], "frames": "each frame as an image, uniform in "
                                                                               "time (centres of K equal parts)"}}


class Video(Modality):
    name = "video"
    columns = ("video", "video_path", "clip_video", "video_file")
    extensions = EXTENSIONS
    fixed = {"video": "RGB frames, mono float32 soundtrack"}
    default_model = "efficientnet-lite0"
    model_help = "Video frames' image encoder: alias, local folder or hub id (each sampled frame is encoded)."
    options = (Option("video_frames", 8, "Frames sampled uniformly from each video (its sequence length).",
                      low=0, high=MAX_FRAMES),
               Option("max_video_seconds", 30.0, "Read the first this many seconds of each video.", low=0,
                      high=MAX_SECONDS))
    augment_help = "Video: every frame mirrored left-right with p 0.5 (the same for the whole clip)."
    parts = ("audio",)  # its soundtrack

    def column_help(self) -> str:
        return ("Column with video paths (.mp4 .mov .webm .mkv .avi, or animated GIF) (auto-detected: video, "
                "video_path, clip_video, ...).")

    def sequence_length(self, pre: Any) -> int:
        return int(pre.option("video_frames"))

    def load_encoder(self, name: str, trust_remote_code: bool = False, precision: str = "fp32") -> Any:
        return VideoEncoder(Image().load_encoder(name, trust_remote_code, precision))  # its frames': the image one

    def decode(self, media: Any, encoder: Any, pre: Any) -> Any:
        return read_frames(media, int(pre.option("video_frames")), float(pre.option("max_video_seconds")),
                           encoder.image_size)

    def decode_part(self, part: str, media: Any, encoder: Any, pre: Any) -> Any:
        return read_soundtrack(media, encoder.sample_rate, float(pre.option("max_video_seconds")))

    def augment(self, decoded: Any, rng: Any, encoder: Any) -> Any:
        from PIL import ImageOps

        return [ImageOps.mirror(f) for f in decoded] if rng.random() < 0.5 else decoded

    def sample(self) -> Any:
        """A 2-frame grey 64x64 MP4 (the API's warm-up)."""
        import av
        import numpy as np

        buf = io.BytesIO()
        with av.open(buf, "w", format="mp4") as out:
            stream = out.add_stream("mpeg4", rate=2)
            stream.width = stream.height = 64
            stream.pix_fmt = "yuv420p"
            for _ in range(2):
                frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 128, np.uint8), format="rgb24")
                for packet in stream.encode(frame):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        return buf.getvalue()

    def key_parts(self, pre: Any) -> dict:
        return {"frames": int(pre.option("video_frames")), "max_seconds": float(pre.option("max_video_seconds")),
                "sampling": "uniform centres"}


class VideoAudio(Audio):
    """A video's soundtrack when the record has audio of its own: a model input beside `audio`, encoded by the audio
    encoder (`--audio-model`), trimmed to --max-video-seconds like the frames. No column, file or flag of its own."""

    name = "video_audio"
    columns = ()
    extensions = frozenset()
    options = ()
    augment_help = ""  # --augment treats it as audio (the audio sentence says how)
    transcribable = False
    fixed = {}
    carried_by = "video"
    encoder_of = "audio"

    def column_help(self) -> str:
        return "The soundtrack of the video column when the record has its own audio (no column of its own)."

    def key_parts(self, pre: Any) -> dict:
        return self.with_rate({"max_seconds": float(pre.option("max_video_seconds"))}, pre)

    def longest(self, pre: Any) -> float:
        return float(pre.option("max_video_seconds"))

    def sample(self) -> Any:
        return None
