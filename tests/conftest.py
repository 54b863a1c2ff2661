"""Shared fixtures: offline, one torch thread, tiny random models built from configs, synthetic media."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REAL_HOME = Path(os.environ.get("MMLLM_HOME", Path.home() / ".cache" / "mmllm"))
ROOT = Path(__file__).resolve().parents[1]
WORDS = ["big", "small", "red", "blue", "yes", "no", "the", "it", "is", "a", "large", "tiny", "one", "thing"]


@pytest.fixture(scope="session")
def openvino_folder(tmp_path_factory) -> Path:
    """Where encoders converted for OpenVINO are kept (models, not features): the real cache's, or one folder for
    the session, so each model (the session's tiny ones too) is converted once."""
    real = REAL_HOME / "openvino"
    return real if real.is_dir() else tmp_path_factory.mktemp("openvino")


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch, openvino_folder):
    """Each test gets its own MMLLM_HOME (feature cache); built-in models are linked from the real cache."""
    home = tmp_path / "mmllm_home"
    home.mkdir()
    if (REAL_HOME / "models").is_dir():
        (home / "models").symlink_to(REAL_HOME / "models")
    (home / "openvino").symlink_to(openvino_folder)
    monkeypatch.setenv("MMLLM_HOME", str(home))
    return home


def make_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator([" ".join(WORDS)] * 10, trainer)
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
        ("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random transformers models (hidden <= 32, 2 layers) saved as local Hugging Face folders."""
    from transformers import (BertConfig, BertModel, ViTConfig, ViTImageProcessor, ViTModel, Wav2Vec2Config,
                              Wav2Vec2FeatureExtractor, Wav2Vec2Model, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration)

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    out = {}
    tok = make_tokenizer()
    text = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64))
    out["text"] = root / "bert"
    text.save_pretrained(out["text"])
    tok.save_pretrained(out["text"])
    vit = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64))
    out["image"] = root / "vit"
    vit.save_pretrained(out["image"])
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out["image"])
    w2v = Wav2Vec2Model(Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                       conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4),
                                       num_feat_extract_layers=2, num_conv_pos_embeddings=16,
                                       num_conv_pos_embedding_groups=2, vocab_size=10))
    out["audio"] = root / "wav2vec2"
    w2v.save_pretrained(out["audio"])
    Wav2Vec2FeatureExtractor(sampling_rate=16000).save_pretrained(out["audio"])
    whisper = WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=100, num_mel_bins=80, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=1500,
        max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1))
    with torch.no_grad():  # a random decoder repeats one token and never ends, which Transcriber rejects: this one
        # ends after 3 tokens whatever it hears (feature 0 of its position table is -1 before position 3 and +1 from
        # there on, and the end token's tied embedding reads that feature); the encoder stays random
        dec = whisper.model.decoder
        dec.embed_positions.weight[:, 0] = torch.where(torch.arange(dec.embed_positions.weight.shape[0]) >= 3, 1., -1.)
        dec.embed_tokens.weight[2] = torch.nn.functional.one_hot(torch.tensor(0), 32) * 5.0
    out["whisper"] = root / "whisper"
    whisper.save_pretrained(out["whisper"])
    WhisperFeatureExtractor(feature_size=80).save_pretrained(out["whisper"])
    return out


def sine(seconds: float = 0.5, freq: float = 440.0, sr: int = 16000, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([x] * channels, 1) if channels > 1 else x


def write_wav(path: Path, freq: float = 440.0, seconds: float = 0.5, sr: int = 16000, subtype: str = "PCM_16",
              channels: int = 1, fmt: str | None = None) -> Path:
    import soundfile as sf

    sf.write(str(path), sine(seconds, freq, sr, channels), sr, subtype=subtype, format=fmt)
    return path


def write_image(path: Path, color: tuple[int, int, int] = (200, 30, 30), size: int = 40, **save) -> Path:
    from PIL import Image

    Image.new("RGB", (size, size), color).save(path, **save)
    return path


@pytest.fixture
def toy_manifest(tmp_path) -> Path:
    """A 48-record manifest whose label needs both image colour and text: red/blue x big/small."""
    media = tmp_path / "media"
    media.mkdir()
    rows = []
    rng = np.random.default_rng(0)
    for i in range(48):
        color = ["red", "blue"][i % 2]
        size = ["big", "small"][(i // 2) % 2]
        rgb = (200, 30, 30) if color == "red" else (30, 30, 200)
        jitter = tuple(int(np.clip(c + rng.integers(-20, 20), 0, 255)) for c in rgb)
        write_image(media / f"img{i}.png", jitter)
        write_wav(media / f"a{i}.wav", freq=300 + 40 * (i % 5))
        rows.append({"id": f"r{i}", "text": f"it is {size}", "image": f"media/img{i}.png", "audio": f"media/a{i}.wav",
                     "label": f"{color}-{size}", "target": f"a {size} {color} thing"})
    return write_csv(tmp_path / "manifest.csv", rows)


def write_csv(path: Path, rows: list[dict]) -> Path:
    """A CSV manifest with the first row's keys as header."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def one_line_error(r) -> str:
    """The single stderr line of a user error (exit 2, no traceback)."""
    assert r.exit_code == 2, r.output
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def run_cli(*args: str, input: str | None = None):
    """Invoke the CLI in-process; returns the click Result (stdout, stderr, exit_code)."""
    from typer.testing import CliRunner

    from mmllm.cli import app
    from mmllm.console import set_quiet

    set_quiet(False)
    result = CliRunner().invoke(app, [str(a) for a in args], input=input)
    return result


def tiny_prepare_args(models: dict, manifest: Path, out: Path, audio: str = "audio") -> list[str]:
    return ["prepare", str(manifest), "--output", str(out), "--text-model", str(models["text"]),
            "--image-model", str(models["image"]), "--audio-model", str(models[audio]), "--batch-size", "8"]


@pytest.fixture
def prepared(tiny_models, toy_manifest, tmp_path) -> Path:
    out = tmp_path / "prepared"
    r = run_cli(*tiny_prepare_args(tiny_models, toy_manifest, out))
    assert r.exit_code == 0, r.output
    return out


def load_json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip().startswith("{")]


__all__ = ["ROOT", "run_cli", "write_csv", "one_line_error",
           "write_wav", "write_image", "sine", "tiny_prepare_args", "load_json_lines", "shutil"]


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory) -> Path:
    """A tiny random GPT-2 (hidden 32, 2 layers) with the test tokenizer, as a local folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tok = make_tokenizer()
    tok.eos_token = "[SEP]"
    folder = tmp_path_factory.mktemp("tiny") / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                               eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def trained_checkpoint(tiny_models, tmp_path_factory) -> Path:
    """A tiny text-only classifier checkpoint (session-wide, for fuzzing predict)."""
    root = tmp_path_factory.mktemp("ckpt")
    rows = [{"id": i, "text": ["it is big", "it is small"][i % 2], "label": ["b", "s"][i % 2]} for i in range(20)]
    (root / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert run_cli("prepare", str(root / "m.jsonl"), "--output", str(root / "p"), "--text-model",
                   str(tiny_models["text"])).exit_code == 0
    r = run_cli("finetune", str(root / "p"), "--output", str(root / "ck"), "--epochs", "1", "--hidden-size", "16")
    assert r.exit_code == 0, r.output
    return root / "ck"
