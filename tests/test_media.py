"""Format conversion: every image and audio format lands in one canonical form; bad files give reasons."""

import io

import numpy as np
import pytest
from PIL import Image

from conftest import write_wav
from mmllm.media import MediaError, load_audio, load_image, normalize_text


@pytest.mark.parametrize("fmt,mode", [("JPEG", "RGB"), ("PNG", "RGB"), ("PNG", "P"), ("PNG", "RGBA"), ("PNG", "L"),
                                      ("WEBP", "RGB"), ("BMP", "RGB"), ("TIFF", "RGB"), ("JPEG", "CMYK"),
                                      ("GIF", "P"), ("PNG", "LA")])
def test_image_formats_become_rgb(tmp_path, fmt, mode):
    img = Image.new("RGB", (20, 10), (250, 10, 10)).convert(mode)
    path = tmp_path / f"x.{fmt.lower()}"
    img.save(path, format=fmt)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (20, 10)
    r, g, b = out.getpixel((5, 5))
    assert r > 150 and g < 120 and b < 120 or mode in ("L", "LA")


def test_16bit_png_is_scaled(tmp_path):
    arr = np.full((8, 8), 65535 // 2, dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    out = np.asarray(load_image(tmp_path / "g16.png"))
    assert out.shape == (8, 8, 3) and 120 <= out[0, 0, 0] <= 135


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (30, 10), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    img.save(tmp_path / "o.jpg", exif=exif)
    assert load_image(tmp_path / "o.jpg").size == (10, 30)


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    assert load_image(tmp_path / "a.gif").getpixel((1, 1))[0] > 200


@pytest.mark.parametrize("make,reason", [
    (lambda p: p.write_bytes(b""), "empty file"),
    (lambda p: p.write_text("hello, not a picture"), "not an image"),
    (lambda p: p.write_bytes(_jpeg()[:200]), "corrupt image"),
    (lambda p: p.mkdir(), "is a folder"),
    (lambda p: p.symlink_to(p.parent / "nowhere.png"), "broken symlink"),
])
def test_bad_images_give_reasons(tmp_path, make, reason):
    p = tmp_path / "bad.png"
    make(p)
    with pytest.raises(MediaError, match=reason):
        load_image(p)


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="JPEG")
    return buf.getvalue()


def test_decompression_bomb_refused(tmp_path):
    Image.new("1", (12000, 8000)).save(tmp_path / "bomb.png")  # 96 Mpixel, a few KB on disk
    with pytest.raises(MediaError, match="decompression bomb"):
        load_image(tmp_path / "bomb.png")


@pytest.mark.parametrize("subtype,fmt,ext", [("PCM_U8", "WAV", "wav"), ("PCM_16", "WAV", "wav"),
                                              ("PCM_24", "WAV", "wav"), ("PCM_32", "WAV", "wav"),
                                              ("FLOAT", "WAV", "wav"), ("PCM_16", "FLAC", "flac"),
                                              ("VORBIS", "OGG", "ogg"), ("MPEG_LAYER_III", "MP3", "mp3")])
def test_audio_formats_mono_16k(tmp_path, subtype, fmt, ext):
    path = write_wav(tmp_path / f"a.{ext}", freq=440, seconds=1.0, sr=8000, subtype=subtype, channels=2, fmt=fmt)
    x = load_audio(path, 16000)
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) - 16000) < 1200  # mp3 adds encoder padding
    spectrum = np.abs(np.fft.rfft(x))
    assert abs(np.argmax(spectrum) * 16000 / len(x) - 440) < 10  # still a 440 Hz tone after resampling


def test_max_seconds_trims(tmp_path):
    path = write_wav(tmp_path / "long.wav", seconds=5.0)
    assert len(load_audio(path, 16000, max_seconds=1.5)) == 24000


def test_bad_audio_gives_reasons(tmp_path):
    (tmp_path / "e.wav").write_bytes(b"")
    with pytest.raises(MediaError, match="empty file"):
        load_audio(tmp_path / "e.wav", 16000)
    good = write_wav(tmp_path / "g.wav").read_bytes()
    (tmp_path / "t.wav").write_bytes(good[:20])
    with pytest.raises(MediaError, match="cannot decode audio"):
        load_audio(tmp_path / "t.wav", 16000)
    import soundfile as sf

    sf.write(str(tmp_path / "nan.wav"), np.array([0.1, np.nan, 0.2] * 100, dtype=np.float32), 16000, subtype="FLOAT")
    with pytest.raises(MediaError, match="NaN"):
        load_audio(tmp_path / "nan.wav", 16000)
    sf.write(str(tmp_path / "zero.wav"), np.zeros((0,), dtype=np.float32), 16000)
    with pytest.raises(MediaError):
        load_audio(tmp_path / "zero.wav", 16000)


def test_text_normalization():
    assert normalize_text("\ufeffCafe\u0301  au\n lait") == "Caf\u00e9 au lait"
    assert normalize_text(None) == "" and normalize_text(float("nan")) == ""


def test_media_from_bytes(tmp_path):
    img = load_image(_png_bytes())
    assert img.size == (5, 5)
    wav = write_wav(tmp_path / "a.wav").read_bytes()
    assert load_audio(wav, 16000).shape == (8000,)


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (5, 5)).save(buf, format="PNG")
    return buf.getvalue()


def test_min_side_downsizes_while_decoding_and_refuses_strips(tmp_path):
    img = Image.new("RGB", (3000, 1000), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    img.save(tmp_path / "big.jpg", exif=exif)
    assert load_image(tmp_path / "big.jpg", 224).size == (250, 750)  # JPEG drafted at 1/4, then EXIF applied
    Image.new("RGB", (2000, 1000), (250, 10, 10)).convert("P").save(tmp_path / "big.png")
    out = load_image(tmp_path / "big.png", 224)
    assert out.mode == "RGB" and out.size == (500, 250) and out.getpixel((5, 5))[0] > 200  # reduce(4)
    assert load_image(tmp_path / "big.png").size == (2000, 1000)  # without min_side: full size
    Image.new("RGB", (4000, 1), (0, 0, 0)).save(tmp_path / "strip.png")
    assert load_image(tmp_path / "strip.png").size == (4000, 1)
    with pytest.raises(MediaError, match=r"image 4000x1 is too elongated \(aspect ratio over 50:1"):
        load_image(tmp_path / "strip.png", 224)


def test_audio_beyond_any_full_scale_is_refused_not_turned_into_nan(tmp_path):
    import soundfile as sf

    from mmllm.media import MediaError, load_audio

    for peak, ok in ((1e30, False), (1001.0, False), (3.0, True)):  # float WAV holds any value; +-1 is full scale
        path = tmp_path / f"p{peak:g}.wav"
        sf.write(path, np.full(1600, peak, np.float32), 16000, subtype="FLOAT")
        if ok:
            assert float(load_audio(path, 16000).max()) == pytest.approx(peak)
        else:
            with pytest.raises(MediaError, match="beyond 1000 x full scale"):
                load_audio(path, 16000)
