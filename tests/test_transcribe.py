"""prepare --transcribe: Whisper transcripts stored, cached, paired with the text for the text model, and redone by
predict/eval for raw records. The tiny random Whisper writes gibberish, but the same gibberish every time."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import load_json_lines, make_tokenizer, run_cli, write_csv, write_wav


@pytest.fixture(scope="session")
def tiny_whisper(tiny_models, tmp_path_factory) -> Path:
    """The tiny random Whisper of conftest with a tokenizer, so its token ids decode to words."""
    folder = tmp_path_factory.mktemp("asr") / "whisper"
    shutil.copytree(tiny_models["whisper"], folder)
    make_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def runaway_whisper(tiny_models, tmp_path_factory) -> Path:
    """tiny_whisper with its decoder left random: it repeats one token and never writes the end token."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    folder = tmp_path_factory.mktemp("asr") / "runaway"
    shutil.copytree(tiny_models["whisper"], folder)
    torch.manual_seed(0)
    WhisperForConditionalGeneration(WhisperConfig.from_pretrained(folder)).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def write_manifest(folder: Path, rows: list[dict]) -> Path:
    return write_csv(folder / "m.csv", rows)


@pytest.fixture
def speech_manifest(tmp_path) -> Path:
    """24 records: 4 distinct clips (sines), a split column; some records without text, some without audio."""
    rows = []
    for i in range(24):
        audio = write_wav(tmp_path / f"a{i}.wav", freq=300 + 100 * (i % 4), seconds=0.5 + 0.1 * (i % 4))
        rows.append({"id": f"r{i}", "text": "" if i % 6 == 1 else ["it is big", "it is small"][i % 2],
                     "audio": "" if i % 6 == 2 else audio.name, "label": ["b", "s"][i % 2],
                     "reference": ["yes", "no"][i % 2], "split": ["train", "train", "validation", "test"][i % 4]})
    return write_manifest(tmp_path, rows)


def prepare(models: dict, whisper: Path, manifest: Path, out: Path, *extra: str) -> dict:
    r = run_cli("prepare", manifest, "--output", out, "--text-model", models["text"], "--audio-model",
                models["whisper"], "--transcribe", "--transcribe-model", whisper, "--batch-size", "3", *extra)
    assert r.exit_code == 0, r.output
    return load_json_lines(r.stdout)[-1]


def asgi_get_json(predictor, path: str) -> dict:
    """GET `path` from serve's application over `predictor` (ASGI, no socket)."""
    import asyncio

    from mmllm.config import ServeConfig
    from mmllm.serve import build_app

    app, sent = build_app(predictor, ServeConfig(checkpoint="ck")), []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(b"host", b"localhost")], "http_version": "1.1", "scheme": "http", "root_path": "",
             "server": ("localhost", 80), "client": ("127.0.0.1", 1)}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 200, sent
    return json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


def split_rows(out: Path) -> list[dict]:
    from mmllm.features import load_prepared

    ds, _ = load_prepared(out)
    return [row for split in ds for row in ds[split].to_list()]


def test_transcripts_stored_reported_and_paired_with_text(tiny_models, tiny_whisper, speech_manifest, tmp_path):
    from mmllm.encoders import Transcriber
    from mmllm.features import META
    from mmllm.media import load_audio

    summary = prepare(tiny_models, tiny_whisper, speech_manifest, tmp_path / "p")
    meta = json.loads((tmp_path / "p" / META).read_text())
    asr = Transcriber(str(tiny_whisper))
    assert meta["preprocessing"]["transcribe"]["identity"] == asr.identity
    assert meta["features"]["transcript"] == ["string"]
    rows = {r["id"]: r for r in split_rows(tmp_path / "p")}
    with_audio = [r for r in rows.values() if r["transcript"] is not None]
    assert len(with_audio) == 20 and all(rows[f"r{i}"]["transcript"] is None for i in range(2, 24, 6))
    assert meta["transcripts"]["records"] == 20 and summary["transcripts"]["records"] == 20
    assert meta["transcripts"]["transcribed"] == 4  # one per distinct clip
    # the stored transcript is what the recognizer says of the clip, alone in its batch
    clip = load_audio(speech_manifest.parent / "a0.wav", 16000)
    assert rows["r0"]["transcript"] == asr.transcribe([clip])[0] != ""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["text"])
    for r in rows.values():
        if r["text"] and r["transcript"]:  # [CLS] text [SEP] transcript [SEP]
            assert r["input_ids"] == tok(r["text"], r["transcript"], truncation=True, max_length=64)["input_ids"]
        else:  # the one there is, alone
            assert r["input_ids"] == tok(r["text"] or r["transcript"], truncation=True, max_length=64)["input_ids"]
        assert r["has_text"] == bool(r["text"] or r["transcript"])
    assert rows["r1"]["text"] == "" and rows["r1"]["has_text"]  # no text: the transcript is the text


def test_second_prepare_reuses_transcripts(tiny_models, tiny_whisper, speech_manifest, tmp_path):
    prepare(tiny_models, tiny_whisper, speech_manifest, tmp_path / "p1")
    summary = prepare(tiny_models, tiny_whisper, speech_manifest, tmp_path / "p2")
    assert summary["transcripts"]["transcribed"] == 0 and summary["transcripts"]["records"] == 20
    assert split_rows(tmp_path / "p1") == split_rows(tmp_path / "p2")
    cached = list((Path(tmp_path / "mmllm_home") / "features").rglob("*.safetensors"))
    assert len(cached) == 4 + 4  # audio features and transcripts of the 4 distinct clips


def test_wer_against_reference_column(tiny_models, tiny_whisper, speech_manifest, tmp_path):
    import jiwer

    from mmllm.features import META

    prepare(tiny_models, tiny_whisper, speech_manifest, tmp_path / "p")
    report = json.loads((tmp_path / "p" / META).read_text())["transcripts"]
    rows = sorted((r for r in split_rows(tmp_path / "p") if r["transcript"] is not None), key=lambda r: r["row"])
    refs = {i + 2: ["yes", "no"][i % 2] for i in range(24)}  # the CSV's first record is on row 2
    hyps, gold = [r["transcript"] for r in rows], [refs[r["row"]] for r in rows]
    assert report["reference_column"] == "reference" and report["n_reference"] == 20
    assert report["wer"] == pytest.approx(jiwer.wer(gold, hyps))
    assert report["wer_normalized"] == pytest.approx(jiwer.wer(gold, [h.lower() for h in hyps]))


def test_transcribe_flags_checked(tiny_models, speech_manifest, tmp_path):
    r = run_cli("prepare", speech_manifest, "--output", tmp_path / "p", "--transcribe-model", "x", "--no-transcribe")
    assert r.exit_code == 2 and "--transcribe-model: only used with --transcribe" in r.stderr
    r = run_cli("prepare", speech_manifest, "--output", tmp_path / "p", "--text-model", tiny_models["text"],
                "--audio-model", tiny_models["whisper"], "--transcribe", "--transcribe-model", tiny_models["text"])
    assert r.exit_code == 2 and "is not a Whisper model" in r.stderr
    r = run_cli("prepare", speech_manifest, "--output", tmp_path / "p", "--text-model", tiny_models["text"],
                "--audio-model", tiny_models["whisper"], "--transcribe", "--transcript-reference-column", "nope")
    assert r.exit_code == 2 and "no column 'nope'" in r.stderr


def test_predict_and_eval_transcribe_raw_records_like_prepare(tiny_models, tiny_whisper, speech_manifest, tmp_path):
    """A text-only model trained on text + transcripts: predict and eval on the raw manifest transcribe the audio
    as prepare did (same input ids, same probabilities), and a record with only audio is predicted."""
    from mmllm.features import featurize
    from mmllm.predict import Predictor
    from mmllm.records import raw_records

    prepare(tiny_models, tiny_whisper, speech_manifest, tmp_path / "p")
    r = run_cli("finetune", tmp_path / "p", "--output", tmp_path / "ck", "--modalities", "text", "--epochs", "1",
                "--hidden-size", "16")
    assert r.exit_code == 0, r.output
    predictor = Predictor(str(tmp_path / "ck"))
    assert "transcript" in predictor.encoders
    info = asgi_get_json(predictor, "/info")  # serve's /info says the model transcribes audio, with what
    assert info["transcribes_audio"] is True and info["transcriber"] == str(tiny_whisper)
    records = [x for x in raw_records(str(speech_manifest), predictor.config) if isinstance(x, dict)]
    rows, errors = featurize(records, predictor.encoders, predictor.prep)
    prepared = {r["id"]: r for r in split_rows(tmp_path / "p")}
    assert not errors and len(rows) == 24
    for row in rows:
        assert row["transcript"] == prepared[row["id"]]["transcript"]
        assert list(row["input_ids"]) == prepared[row["id"]]["input_ids"]
    on_raw = run_cli("eval", "model", tmp_path / "ck", speech_manifest, "--no-reliance")
    on_prepared = run_cli("eval", "model", tmp_path / "ck", tmp_path / "p", "--no-reliance")
    assert on_raw.exit_code == 0 and on_prepared.exit_code == 0, on_raw.output + on_prepared.output
    a, b = load_json_lines(on_raw.stdout)[-1], load_json_lines(on_prepared.stdout)[-1]
    assert a["n"] == b["n"] == 6 and a["accuracy"] == b["accuracy"] and a["ece"] == pytest.approx(b["ece"], abs=1e-6)
    audio_only = json.dumps({"id": "x", "audio": str(speech_manifest.parent / "a0.wav")})
    r = run_cli("predict", tmp_path / "ck", "-", input=audio_only + "\n")
    assert r.exit_code == 0, r.output
    out = load_json_lines(r.stdout)
    assert out[0]["id"] == "x" and out[0]["prediction"] in ("b", "s")


def decoded_lengths(transcriber) -> list[int]:
    """Patches `transcriber` to record the number of tokens decoded per clip, in the order it decodes them."""
    lengths: list[int] = []
    greedy = transcriber._greedy

    def spy(*args):
        out = greedy(*args)
        lengths.extend(len(ids) for ids, _ in out)
        return out

    transcriber._greedy = spy
    return lengths


def test_decoded_tokens_are_bounded_by_the_clip_duration(runaway_whisper):
    """A decoder that never ends stops at TOKENS_PER_SECOND of each clip's own audio (at least MIN_TOKENS), each
    clip of one batch at its own cap, and its transcript is left empty with one summary line."""
    from conftest import sine
    from mmllm.encoders import Transcriber

    asr = Transcriber(str(runaway_whisper))
    assert asr.max_tokens == 31  # max_target_positions 32, minus the prompt
    seconds = [2.5, 0.5, 1.5, 0.2]  # one 10 s window: decoded together
    caps = [asr.token_cap(int(s * 16000)) for s in seconds]
    assert caps == [20, 8, 12, 8] == [max(asr.MIN_TOKENS, math.ceil(asr.TOKENS_PER_SECOND * s)) for s in seconds]
    lengths = decoded_lengths(asr)
    assert asr.transcribe([sine(s, 300) for s in seconds]) == ["", "", "", ""]
    assert sorted(lengths) == sorted(caps)  # decoded shortest first
    assert asr.token_cap(16000 * 60) == asr.max_tokens == 31
    assert asr.rejected == {"no end within the token cap": 4}
    line = asr.report()
    assert line.startswith("4 clips not transcribed (4 no end within the token cap)") and "\n" not in line


def test_a_transcript_does_not_depend_on_its_batch(tiny_whisper):
    from conftest import sine
    from mmllm.encoders import Transcriber

    asr = Transcriber(str(tiny_whisper))
    clips = [sine(s, f) for s, f in [(0.5, 300), (2.5, 500), (12.0, 400), (0.7, 600)]]  # windows 10, 10, 12, 10 s
    together = asr.transcribe(clips)
    assert together == [asr.transcribe([c])[0] for c in clips] and all(together)
    assert asr.rejected == {} and asr.report() is None


@pytest.mark.parametrize("text, ended, logprob, no_speech, why", [
    ("Please open the door.", True, -0.12, 0.11, None),
    ("No.", True, -1.03, 0.58, None),  # the least sure of the 48 English sample_data clips
    ("No.", True, -0.57, 0.61, None),  # the most "no speech" of them
    ("(laughs) Yes.", True, -0.5, 0.2, None),  # a caption beside words is kept
    ("", True, -0.1, None, None),  # the end token at once: nothing said
    ("I'm not sure if I'm not sure if", False, -1.5, 0.28, "no end within the token cap"),
    ("(speaking in foreign language)", True, -0.8, 0.35, "foreign language"),
    ("(water running)", True, -1.16, 0.95, "a sound caption, not speech"),
    ("[SOUND]", True, -1.3, 0.93, "a sound caption, not speech"),
    ("to be able " * 12, True, -0.3, 0.1, "repetitive text"),
    ("you", True, -0.71, 0.99, "no speech"),  # what whisper-tiny.en says of silence
    ("We", True, -1.83, 0.65, "no speech"),  # Whisper's test: P(no speech) > 0.6 and mean log-prob < -1
    ("We", True, -0.9, 0.65, None),
])
def test_verdict(text, ended, logprob, no_speech, why):
    from mmllm.encoders import Transcriber

    assert Transcriber.verdict(text, ended=ended, logprob=logprob, no_speech=no_speech) == why


def test_prepare_prints_one_line_for_the_clips_it_could_not_transcribe(tiny_models, runaway_whisper, speech_manifest,
                                                                      tmp_path):
    from mmllm.features import META

    r = run_cli("prepare", speech_manifest, "--output", tmp_path / "p", "--text-model", tiny_models["text"],
                "--audio-model", tiny_models["whisper"], "--transcribe", "--transcribe-model", runaway_whisper,
                "--batch-size", "3")
    assert r.exit_code == 0, r.output
    lines = [x for x in r.stderr.splitlines() if "not transcribed" in x]
    assert len(lines) == 1 and "4 clips not transcribed (4 no end within the token cap)" in lines[0], r.stderr
    report = json.loads((tmp_path / "p" / META).read_text())["transcripts"]
    assert report["rejected"] == {"no end within the token cap": 4} and report["empty"] == report["records"] == 20
    assert load_json_lines(r.stdout)[-1]["transcripts"]["rejected"] == report["rejected"]
    assert {row["transcript"] for row in split_rows(tmp_path / "p")} == {None, ""}


def speak(folder: Path, voice: str, said: list[str]) -> list:
    from mmllm.media import load_audio

    clips = []
    for i, text in enumerate(said):
        path = folder / f"{voice}{i}.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True)
        clips.append(load_audio(path, 16000))
    return clips


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (apt-get install espeak-ng)")
def test_whisper_tiny_en_leaves_french_and_noise_empty(tmp_path):
    """The English-only model on French (two voices: one makes it write captions, the other run away), noise and
    silence: empty transcripts, each decode within its clip's cap; English beside them is still transcribed."""
    import numpy as np

    from mmllm.encoders import Transcriber

    french = ["Bonjour, je m'appelle Marie et j'habite à Paris depuis dix ans.",
              "Le chat dort sur le canapé pendant que la pluie tombe.",
              "Nous allons au marché samedi matin pour acheter des légumes."]
    clips = speak(tmp_path, "fr", french) + speak(tmp_path, "fr+f3", french)
    rng = np.random.default_rng(0)
    clips += [(0.1 * rng.normal(size=3 * 16000)).astype(np.float32), np.zeros(2 * 16000, np.float32)]
    english = speak(tmp_path, "en-gb", ["Could you tell me the way to the railway station?", "please open the door"])
    asr = Transcriber("whisper-tiny.en")
    lengths = decoded_lengths(asr)
    texts = [asr.transcribe([c])[0] for c in clips + english]
    assert texts[:len(clips)] == [""] * len(clips), texts
    assert "station" in texts[-2].lower() and "door" in texts[-1].lower(), texts
    assert all(n <= asr.token_cap(len(c)) for n, c in zip(lengths, clips + english)), lengths
    # clips of 3.03 s at most: not the hundreds of tokens an unbounded decoder reaches
    assert max(lengths[:len(clips)]) <= asr.token_cap(int(3.1 * 16000)) == 25
    assert sum(asr.rejected.values()) == len(clips) and asr.rejected.get("foreign language", 0) >= 3, asr.rejected


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (apt-get install espeak-ng)")
def test_whisper_tiny_en_transcribes_a_spoken_word(tmp_path):
    from mmllm.encoders import Transcriber
    from mmllm.media import load_audio

    spoken = {"yes": "yes", "no": "no", "please open the door": "door"}  # what is said: a word the transcript has
    clips = []
    for i, said in enumerate(spoken):
        subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(tmp_path / f"{i}.wav"), said], check=True)
        clips.append(load_audio(tmp_path / f"{i}.wav", 16000))
    texts = Transcriber("whisper-tiny.en").transcribe(clips)  # decoded together (same 10 s window)
    for word, text in zip(spoken.values(), texts):
        assert word in text.lower().strip(".,!?").split(), texts


def test_transcription_is_on_by_default_only_with_the_embedded_whisper(tiny_models, speech_manifest, tmp_path):
    """auto: a custom --audio-model is not asked to transcribe (and is not replaced by another model's ears)."""
    import json

    from mmllm.config import PrepareConfig

    assert PrepareConfig.__dataclass_fields__["transcribe"].default is None  # auto
    r = run_cli("prepare", speech_manifest, "--output", tmp_path / "p", "--text-model", tiny_models["text"],
                "--audio-model", tiny_models["whisper"])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "p" / "mmllm-prepared.json").read_text())
    assert meta["preprocessing"]["transcribe"] is None and "transcript" not in meta["features"]
