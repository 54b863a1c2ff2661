"""A corpus of malformed inputs: each gets one clear line naming the record, column and reason, the good
records in the same input are still processed, and no traceback is printed."""

import io
import json

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from conftest import run_cli, write_image, write_wav

from mmllm import modalities

GOOD = 6


def _png_bad_crc(p):
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[29] ^= 0xFF  # inside the IHDR chunk's CRC
    p.write_bytes(bytes(data))


def _jpeg_truncated(p):
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(buf, format="JPEG")
    p.write_bytes(buf.getvalue()[:300])


def _bomb(p):
    Image.new("1", (12000, 8000)).save(p)


def _wav_truncated_header(p):
    write_wav(p)
    p.write_bytes(p.read_bytes()[:30])


def _wav_nan(p):
    sf.write(str(p), np.array([0.1, np.nan, np.inf] * 200, dtype=np.float32), 16000, subtype="FLOAT")


def _wav_zero(p):
    sf.write(str(p), np.zeros((0,), dtype=np.float32), 16000)


def _mp3_corrupt(p):
    write_wav(p, seconds=1.0, subtype="MPEG_LAYER_III", fmt="MP3")
    data = bytearray(p.read_bytes())
    for i in range(400, len(data) - 400, 97):  # damage frames in the middle
        data[i] ^= 0x5A
    p.write_bytes(bytes(data))


# name -> (column, how to make the bad file, expected reason; None: the record must succeed)
MEDIA_CASES = {
    "missing_file": ("image", None, "file not found"),
    "empty_image": ("image", lambda p: p.write_bytes(b""), "empty file"),
    "truncated_jpeg": ("image", _jpeg_truncated, "image"),
    "png_bad_crc": ("image", _png_bad_crc, "image"),
    "text_named_png": ("image", lambda p: p.write_text("hello"), "not an image"),
    "decompression_bomb": ("image", _bomb, "decompression bomb"),
    "image_path_is_folder": ("image", lambda p: p.mkdir(), "is a folder"),
    "broken_symlink": ("image", lambda p: p.symlink_to(p.parent / "gone.png"), "broken symlink"),
    "one_pixel_image": ("image", lambda p: write_image(p, size=1), None),
    "png_16bit": ("image", lambda p: Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(p), None),
    "cmyk_jpeg": ("image", lambda p: Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(p, format="JPEG"), None),
    "animated_gif": ("image", lambda p: Image.new("RGB", (8, 8)).save(
        p, format="GIF", save_all=True, append_images=[Image.new("RGB", (8, 8))]), None),
    "spaces_and_unicode_path": ("image", lambda p: write_image(p), None),
    "truncated_wav_header": ("audio", _wav_truncated_header, "cannot decode audio"),
    "zero_length_audio": ("audio", _wav_zero, "audio"),
    "nan_inf_samples": ("audio", _wav_nan, "NaN or Inf"),
    "stereo_8k_24bit": ("audio", lambda p: write_wav(p, sr=8000, subtype="PCM_24", channels=2), None),
    "empty_audio_file": ("audio", lambda p: p.write_bytes(b""), "empty file"),
    "audio_path_is_folder": ("audio", lambda p: p.mkdir(), "is a folder"),
    "mp3_corrupt_frames": ("audio", _mp3_corrupt, None),  # libsndfile resyncs on damaged frames: decodes
}


def base_rows(tmp):
    rows = []
    for i in range(GOOD):
        write_image(tmp / f"g{i}.png", (200, 30, 30) if i % 2 else (30, 30, 200))
        write_wav(tmp / f"g{i}.wav", freq=300 + 50 * i)
        rows.append({"id": f"good{i}", "text": "it is big" if i % 2 else "it is small", "image": f"g{i}.png",
                     "audio": f"g{i}.wav", "label": "a" if i % 2 else "b"})
    return rows


def prepare(tiny_models, tmp_path, rows, *extra, name="m.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return run_cli("prepare", str(path), "--output", str(tmp_path / "out"), "--text-model", str(tiny_models["text"]),
                   "--image-model", str(tiny_models["image"]), "--audio-model", str(tiny_models["audio"]),
                   "--val-fraction", "0", "--test-fraction", "0", *extra)


@pytest.mark.parametrize("case", sorted(MEDIA_CASES))
def test_bad_media(case, tiny_models, tmp_path):
    column, make, reason = MEDIA_CASES[case]
    ext = {"image": ".png", "audio": ".wav"}[column]
    if case == "truncated_jpeg" or case == "cmyk_jpeg":
        ext = ".jpg"
    if case == "animated_gif":
        ext = ".gif"
    if case == "mp3_corrupt_frames":
        ext = ".mp3"
    fname = ("bad file ünï" if case == "spaces_and_unicode_path" else "bad") + ext
    if make:
        make(tmp_path / fname)
    rows = base_rows(tmp_path)
    bad = dict(rows[0], id="bad1")
    bad[column] = fname
    r = prepare(tiny_models, tmp_path, rows + [bad])
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output
    summary = json.loads(r.stdout)
    meta = json.loads((tmp_path / "out" / "mmllm-prepared.json").read_text())
    if reason is None:
        assert summary["skipped"] == 0 and summary["counts"]["train"] == GOOD + 1
    else:
        assert summary["skipped"] == 1 and summary["counts"]["train"] == GOOD
        entry = meta["skipped"][0]
        assert entry["id"] == "bad1" and entry["column"] == column and reason in entry["reason"]
        line = [x for x in r.stderr.splitlines() if "bad1" in x]
        assert line and f"column {column}" in line[0]


def test_hour_long_audio_is_trimmed(tiny_models, tmp_path):
    sr = 8000
    with sf.SoundFile(str(tmp_path / "hour.wav"), "w", sr, 1, subtype="PCM_16") as f:
        block = (0.1 * np.sin(np.arange(sr * 60) * 0.05)).astype(np.float32)
        for _ in range(60):
            f.write(block)
    rows = base_rows(tmp_path)
    rows.append(dict(rows[0], id="hour", audio="hour.wav"))
    r = prepare(tiny_models, tmp_path, rows, "--max-audio-seconds", "2")
    assert r.exit_code == 0 and json.loads(r.stdout)["skipped"] == 0


@pytest.mark.parametrize("case", ["duplicate_id", "empty_label", "malformed_json", "text_is_object", "no_media",
                                  "unknown_split"])
def test_bad_records(case, tiny_models, tmp_path):
    rows = base_rows(tmp_path)
    bad = dict(rows[0], id="bad1")
    expected = {"duplicate_id": ("id", "duplicate id"), "empty_label": ("label", "empty label"),
                "malformed_json": (None, "malformed JSON"), "text_is_object": ("text", "expected text"),
                "no_media": (None, f"no {modalities.spelled()}"), "unknown_split": ("split", "unknown split")}[case]
    if case == "duplicate_id":
        bad["id"] = "good1"
    elif case == "empty_label":
        bad["label"] = ""
    elif case == "text_is_object":
        bad["text"] = {"nested": 1}
    elif case == "no_media":
        bad.update(text="", image="", audio="")
    elif case == "unknown_split":
        rows = [dict(r, split="train") for r in rows]
        bad["split"] = "holdout"
    path_rows = rows + [bad]
    if case == "malformed_json":
        path = tmp_path / "m.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"id": "bad1", "text": \n')
        r = run_cli("prepare", str(path), "--output", str(tmp_path / "out"), "--text-model", str(tiny_models["text"]),
                    "--image-model", str(tiny_models["image"]), "--audio-model", str(tiny_models["audio"]),
                    "--val-fraction", "0", "--test-fraction", "0")
    else:
        r = prepare(tiny_models, tmp_path, path_rows)
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "out" / "mmllm-prepared.json").read_text())
    assert len(meta["skipped"]) == 1
    entry = meta["skipped"][0]
    assert entry["column"] == expected[0] and expected[1] in entry["reason"]
    assert sum(meta["counts"].values()) == GOOD


def test_long_empty_and_mixed_type_text(tiny_models, tmp_path):
    rows = base_rows(tmp_path)
    rows.append(dict(rows[0], id="long", text="big " * 5000))
    rows.append(dict(rows[0], id="empty", text=""))
    rows.append(dict(rows[0], id="number", text=12345, label=7))  # mixed types in JSONL columns
    r = prepare(tiny_models, tmp_path, rows, "--max-text-tokens", "16")
    assert r.exit_code == 0, r.output
    import datasets

    ds = datasets.load_from_disk(str(tmp_path / "out"))["train"]
    by_id = dict(zip(ds["id"], ds["input_ids"]))
    assert len(by_id["long"]) == 16 and by_id["number"]
    assert set(ds.features["label"].int2str(list(ds["label"]))) == {"a", "b", "7"}  # a ClassLabel of the names
    assert dict(zip(ds["id"], ds["has_text"]))["empty"] is False


def test_non_utf8_csv_and_missing_column(tmp_path, tiny_models):
    (tmp_path / "latin.csv").write_bytes("id,text\n1,caf\xe9\n".encode("latin-1"))
    r = run_cli("prepare", str(tmp_path / "latin.csv"), "--output", str(tmp_path / "o"))
    assert r.exit_code == 2 and "not UTF-8" in r.stderr and "offset" in r.stderr and "Traceback" not in r.output
    (tmp_path / "m.csv").write_text("id,text\n1,hello\n")
    r = run_cli("prepare", str(tmp_path / "m.csv"), "--output", str(tmp_path / "o"), "--image-column", "picture")
    assert r.exit_code == 2 and "--image-column: no column 'picture'" in r.stderr


def test_all_records_bad_exits_nonzero(tmp_path, tiny_models):
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": 1, "image": "nope.png"}) + "\n")
    r = run_cli("prepare", str(tmp_path / "m.jsonl"), "--output", str(tmp_path / "o"), "--image-model",
                str(tiny_models["image"]))
    assert r.exit_code == 2 and "skipped" in r.stderr and not (tmp_path / "o").exists()


def test_checkpoint_weights_disagree_with_config(prepared, tmp_path):
    from safetensors.torch import load_file, save_file

    ck = tmp_path / "ck"
    r = run_cli("finetune", str(prepared), "--output", str(ck), "--epochs", "1", "--hidden-size", "32")
    assert r.exit_code == 0, r.output
    state = load_file(str(ck / "model.safetensors"))
    state.pop(next(k for k in state if k.startswith("head.")))
    save_file(state, str(ck / "model.safetensors"))
    r = run_cli("predict", str(ck), "-", input="{}\n")
    assert r.exit_code == 2 and "disagree" in r.stderr and "Traceback" not in r.output
    (ck / "model.safetensors").write_bytes(b"\x00" * 64)
    r = run_cli("eval", "model", str(ck), str(prepared))
    assert r.exit_code == 2 and "not a valid safetensors file" in r.stderr


def test_eval_refuses_other_encoders_and_counts_unseen_labels(prepared, tiny_models, toy_manifest, tmp_path):
    ck = tmp_path / "ck"
    r = run_cli("finetune", str(prepared), "--output", str(ck), "--epochs", "1", "--hidden-size", "32")
    assert r.exit_code == 0, r.output
    other = tmp_path / "other"
    r = run_cli("prepare", str(toy_manifest), "--output", str(other), "--text-model", str(tiny_models["text"]),
                "--image-model", str(tiny_models["image"]), "--audio-model", "logmel")
    assert r.exit_code == 0, r.output
    r = run_cli("eval", "model", str(ck), str(other))
    assert r.exit_code == 2 and "prepared with other encoders" in r.stderr and "audio" in r.stderr
    text = toy_manifest.read_text().replace("red-big", "green-big")
    (toy_manifest.parent / "unseen.csv").write_text(text)
    r = run_cli("eval", "model", str(ck), str(toy_manifest.parent / "unseen.csv"), "--no-reliance")
    assert r.exit_code == 0, r.output
    assert "unseen in training" in r.stderr
    assert "green-big" in json.loads(r.stdout)["per_class"]


def test_predict_bad_lines_continue(prepared, tmp_path):
    ck = tmp_path / "ck"
    r = run_cli("finetune", str(prepared), "--output", str(ck), "--epochs", "1", "--hidden-size", "32")
    assert r.exit_code == 0, r.output
    lines = ['{"id": "a", "text": "it is big"}', '{not json', '[1, 2]', '{"id": "b", "image": "/nope.png"}',
             '{"id": "c", "text": "small"}']
    r = run_cli("predict", str(ck), "-", input="\n".join(lines) + "\n")
    assert r.exit_code == 1
    out = [json.loads(x) for x in r.stdout.splitlines()]
    assert [("error" in o) for o in out] == [False, True, True, True, False]
    assert out[1]["error"].startswith("malformed JSON") and "file not found" in out[3]["error"]
    r = run_cli("predict", str(ck), "-", "--strict", input="\n".join(lines) + "\n")
    out = [json.loads(x) for x in r.stdout.splitlines()]
    assert r.exit_code == 2 and len(out) == 2 and "error" in out[-1]  # stops at the first bad record


def test_non_finite_features_skip_their_record_and_are_never_cached(tiny_models, tmp_path, monkeypatch):
    """An encoder output with NaN or inf (a damaged weights file, an input the model overflows on) is that record's
    one-line error: the others are prepared, and a later run that encodes it finitely is not served the NaN."""
    from mmllm import encoders

    real_encode, real_pooled = encoders.ImageEncoder.encode, encoders.TextEncoder.pooled

    def poisoned(self, images):
        pooled, seqs = real_encode(self, images)
        for j, im in enumerate(images):
            if im.convert("RGB").getpixel((0, 0)) == (0, 255, 0):
                pooled[j, 0] = np.nan
        return pooled, seqs

    def pooled_inf(self, input_ids, *a, **k):
        out = real_pooled(self, input_ids, *a, **k)
        return np.where(np.array([len(ids) > 12 for ids in input_ids])[:, None], np.inf, out)

    rows = base_rows(tmp_path)
    write_image(tmp_path / "green.png", (0, 255, 0))
    rows.append(dict(rows[0], id="nan_image", image="green.png"))
    rows.append(dict(rows[1], id="inf_text", text="a much longer text than any other record here has in it"))
    monkeypatch.setattr(encoders.ImageEncoder, "encode", poisoned)
    monkeypatch.setattr(encoders.TextEncoder, "pooled", pooled_inf)
    r = prepare(tiny_models, tmp_path, rows)
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "out" / "mmllm-prepared.json").read_text())
    skipped = {e["id"]: e for e in meta["skipped"]}
    assert set(skipped) == {"nan_image", "inf_text"} and meta["counts"]["train"] == GOOD
    assert skipped["nan_image"]["column"] == "image" and "non-finite features" in skipped["nan_image"]["reason"]
    assert skipped["inf_text"]["column"] == "text" and "non-finite" in skipped["inf_text"]["reason"]
    line = [x for x in r.stderr.splitlines() if "nan_image" in x]
    assert line and "column image" in line[0] and "NaN or inf" in line[0]
    import datasets

    ds = datasets.load_from_disk(str(tmp_path / "out"))["train"]
    assert np.isfinite(np.asarray(ds["image_emb"])).all() and np.isfinite(np.asarray(ds["text_pooled"])).all()
    monkeypatch.setattr(encoders.ImageEncoder, "encode", real_encode)  # the same files, encoded finitely
    monkeypatch.setattr(encoders.TextEncoder, "pooled", real_pooled)
    r = prepare(tiny_models, tmp_path, rows, "--overwrite")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["skipped"] == 0 and json.loads(r.stdout)["counts"]["train"] == GOOD + 2


def test_brackets_in_a_file_name_are_printed_as_they_are(tmp_path, tiny_models):
    """Messages are plain text, not rich markup: a missing file named `a[/]b.png` (once a MarkupError that ended
    prepare after the good records were encoded) or `[bold]x[/bold].png` (once printed as `x.png`) is named as it
    is in the skip line, and the good record is prepared."""
    write_image(tmp_path / "good.png")
    rows = ["id,text,image,label", "good,fine,good.png,a", "r1,one,a[/]b.png,a", "r2,two,[bold]x[/bold].png,b"]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    r = run_cli("prepare", str(tmp_path / "m.csv"), "--output", str(tmp_path / "p"), "--text-model",
                str(tiny_models["text"]), "--image-model", str(tiny_models["image"]))
    assert r.exit_code == 0, r.output
    assert "a[/]b.png" in r.stderr and "[bold]x[/bold].png" in r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["skipped"] == 2
