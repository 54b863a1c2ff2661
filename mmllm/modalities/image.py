"""The image modality: RGB images (PIL), encoded by a frozen image model (EfficientNet-Lite0 by default)."""

from __future__ import annotations

import os
from typing import Any

from mmllm.modalities.base import Modality, is_array, passes

EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
TYPES = "a path, bytes, a PIL image or a numpy array (H x W [x 1, 3 or 4], uint8, or float in [0, 1])"
# what --augment does to an image (mirror, crop to >= 80% area, brightness/contrast)
AUGMENT = {"flip_p": 0.5, "min_area": 0.8, "jitter": 0.2}


def augment_image(img, rng: Any, p: dict = AUGMENT):
    """Horizontal flip, random crop and brightness/contrast jitter (`AUGMENT`: --augment's help)."""
    import numpy as np
    from PIL import ImageEnhance, ImageOps

    if rng.random() < p["flip_p"]:
        img = ImageOps.mirror(img)
    w, h = img.size
    scale = np.sqrt(rng.uniform(p["min_area"], 1.0))
    cw, ch = max(1, int(w * scale)), max(1, int(h * scale))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = img.crop((left, top, left + cw, top + ch)).resize((w, h))
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(1 - p["jitter"], 1 + p["jitter"]))
    return ImageEnhance.Contrast(img).enhance(rng.uniform(1 - p["jitter"], 1 + p["jitter"]))


def image_bytes(value: Any) -> Any:
    import io

    if passes(value):
        return os.fspath(value) if isinstance(value, os.PathLike) else value
    if not is_array(value):
        raise TypeError(f"an image is {TYPES}, not a {type(value).__name__}")
    import numpy as np
    from PIL import Image as PILImage

    arr = np.asarray(value)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))) or 0 in arr.shape:
        raise ValueError(f"an image array is H x W [x 1, 3 or 4] (channels last), got shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise ValueError("a float image array has NaN or Inf values")
        low, high = float(arr.min()), float(arr.max())
        if low < 0 or high > 1:
            raise ValueError(f"a float image array has values in [0, 1], got {low:g} to {high:g}: divide by 255 "
                             "or pass uint8")
        arr = np.rint(arr * 255).astype(np.uint8)
    elif arr.dtype.kind in "iu":
        if arr.dtype != np.uint8 and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"an integer image array has values 0-255, got {arr.min()} to {arr.max()}")
        arr = arr.astype(np.uint8)
    else:
        raise TypeError(f"an image array is uint8 or float, not {arr.dtype}")
    buf = io.BytesIO()
    PILImage.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


class Image(Modality):
    name = "image"
    columns = ("image", "image_path", "img", "image_file", "picture", "photo", "filepath")
    extensions = EXTENSIONS
    fixed = {"image_mode": "RGB"}
    default_model = "efficientnet-lite0"
    model_help = "Image encoder: alias, local folder or hub id."
    augment_help = ("Images: mirrored left-right with p {flip_p:g}, cropped to a random {min_area:.0%}-100% of their "
                    "area and resized back, brightness and contrast each scaled by a random factor within "
                    "+-{jitter:.0%}.").format(**AUGMENT)
    fid = True
    grid = True  # a convolutional feature map (7x7 for efficientnet-lite0) is stored as a 4x4 grid of cell means

    def key_parts(self, pre: Any) -> dict:
        return {"sequence": "2-D grid cells"} if pre.sequence_features else {}

    def load_encoder(self, name: str, trust_remote_code: bool = False, precision: str = "fp32") -> Any:
        from mmllm.encoders import ImageEncoder

        return ImageEncoder(name, trust_remote_code=trust_remote_code, precision=precision)

    def decode(self, media: Any, encoder: Any, pre: Any) -> Any:
        from mmllm.media import load_image

        return load_image(media, encoder.image_size)  # downsized while decoding: memory bounded per image

    def augment(self, decoded: Any, rng: Any, encoder: Any) -> Any:
        return augment_image(decoded, rng)

    def sample(self) -> Any:
        import numpy as np

        return np.full((64, 64, 3), 128, np.uint8)

    def from_memory(self, value: Any) -> Any:
        return image_bytes(value)
