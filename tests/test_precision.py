"""Frozen encoders in bf16 autocast (+ channels_last for conv nets) give the fp32 pooled features to cosine 0.999,
for each family: tiny random models from conftest, and the real embedded weights (marked slow)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REAL_HOME, run_cli, sine, tiny_prepare_args
from mmllm.encoders import native_bf16, resolve_precision
from mmllm.modalities import load_encoder
from mmllm.features import feature_key
from mmllm.config import PrepareConfig


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (B, D) arrays."""
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def photos(n: int = 6) -> list:
    """Real photographs bundled with scikit-learn, plus random crops of them (varied, natural statistics)."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(0)
    base = [Image.fromarray(a) for a in load_sample_images().images]
    out = list(base)
    while len(out) < n:
        img = base[len(out) % 2]
        x, y = int(rng.integers(0, 300)), int(rng.integers(0, 200))
        out.append(img.crop((x, y, x + 200, y + 200)))
    return out


def clips() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [sine(0.7, 300), sine(1.3, 900) + 0.05 * rng.standard_normal(20800).astype(np.float32)]


TEXTS = ["it is a big red thing", "small blue one", "yes", "the tiny thing is large no"]


def pooled(role: str, name: str, precision: str, media) -> np.ndarray:
    enc = load_encoder(role, name, precision=precision)
    assert enc.precision == precision
    if role == "text":
        return enc.embed(media)
    return enc.encode(media)[0]


# measured (torch 2.13, AMX CPU), worst record: BERT 1.0000, ViT 0.99999, wav2vec2 0.99998, Whisper 0.99999;
# real weights (slow test): EfficientNet-Lite0 0.9995 on photos, 0.9992 on sample_data's flat shapes,
# Whisper tiny.en 0.99995, MiniLM 0.99998
TINY = [("text", "text", lambda: TEXTS), ("image", "image", lambda: photos(4)), ("audio", "audio", clips),
        ("audio", "whisper", clips)]


@pytest.mark.parametrize("role,model,media", TINY, ids=[m for _, m, _ in TINY])
def test_bf16_matches_fp32_tiny(tiny_models, role, model, media):
    items = media()
    fp32 = pooled(role, str(tiny_models[model]), "fp32", items)
    bf16 = pooled(role, str(tiny_models[model]), "bf16", items)
    assert not np.array_equal(fp32, bf16)  # bf16 really ran
    assert cosine(fp32, bf16).min() >= 0.999


@pytest.mark.parametrize("kind", ["resnet", "convnext"])
def test_conv_net_runs_channels_last(tmp_path, kind):
    from test_encoders import save_image_model

    folder = save_image_model(kind, tmp_path / kind)
    fp32 = load_encoder("image", str(folder), precision="fp32")
    bf16 = load_encoder("image", str(folder), precision="bf16")
    assert not fp32.channels_last_for(fp32.model) and bf16.channels_last_for(bf16.model)
    convs = [m for m in bf16.model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    grouped = [c for c in bf16.model.modules() if isinstance(c, torch.nn.Conv2d) and c.groups > 1]
    assert len(grouped) == (2 if kind == "convnext" else 0)  # ConvNeXt's depthwise convs, which run in fp32
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert all(c(torch.ones(1, c.in_channels, 8, 8)).dtype == torch.float32 for c in grouped)
    a, b = fp32.encode(photos(4))[0], bf16.encode(photos(4))[0]
    assert cosine(a, b).min() >= 0.999


def test_vit_is_not_channels_last(tiny_models):
    enc = load_encoder("image", str(tiny_models["image"]), precision="bf16")
    assert not enc.channels_last_for(enc.model)  # one patch conv: nothing to gain


def test_auto_follows_the_hardware(monkeypatch):
    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16") == "bf16"
    assert resolve_precision("auto") == ("bf16" if native_bf16() else "fp32")
    monkeypatch.setattr("mmllm.encoders.native_bf16", lambda device="cpu": False)
    assert resolve_precision("auto") == "fp32"
    monkeypatch.setattr("mmllm.encoders.native_bf16", lambda device="cpu": True)
    assert resolve_precision("auto") == "bf16"


def test_native_bf16_reads_cpu_flags():
    flags = open("/proc/cpuinfo").read()
    assert native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_librosa_front_ends_stay_fp32():
    enc = load_encoder("audio", "logmel", precision="bf16")
    assert enc.precision == "fp32"


def test_precision_in_feature_key(tiny_models):
    cfg = PrepareConfig(input=["x"], output="y")
    fp32 = load_encoder("image", str(tiny_models["image"]), precision="fp32")
    bf16 = load_encoder("image", str(tiny_models["image"]), precision="bf16")
    k32, k16 = (feature_key("image", "abc", e, cfg, 0, "r1") for e in (fp32, bf16))
    assert k32 != k16  # bf16 features never answer an fp32 lookup, nor the reverse
    again = load_encoder("image", str(tiny_models["image"]), precision="fp32")
    assert feature_key("image", "abc", again, cfg, 0, "r1") == k32


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_prepare_records_precision(tiny_models, toy_manifest, tmp_path, precision):
    out = tmp_path / f"prep_{precision}"
    result = run_cli(*tiny_prepare_args(tiny_models, toy_manifest, out), "--precision", precision)
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "mmllm-prepared.json").read_text())
    assert meta["preprocessing"]["precision"] == precision
    assert meta["encoders"]["image"]["precision"] == precision
    assert f"frozen encoders: {'fp32' if precision == 'fp32' else 'bf16 autocast'}" in result.stderr


def test_prepare_auto_records_what_ran(tiny_models, toy_manifest, tmp_path):
    out = tmp_path / "prep_auto"
    result = run_cli(*tiny_prepare_args(tiny_models, toy_manifest, out))
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "mmllm-prepared.json").read_text())
    assert meta["preprocessing"]["precision"] == resolve_precision("auto")
    assert "(auto: " in result.stderr


def sample_images() -> list:
    """The project's own synthetic shapes (flat colours: the hardest case for bf16)."""
    from conftest import ROOT

    return [Image.open(p).convert("RGB") for p in sorted((ROOT / "sample_data" / "images").iterdir())[:16]]


REAL = [("image", "efficientnet-lite0", lambda: photos(8)), ("image", "efficientnet-lite0", sample_images),
        ("audio", "whisper-tiny.en", clips),
        ("text", "minilm", lambda: ["A cat sits on the mat.", "Stock markets fell sharply on Tuesday.",
                                    "What colour is the car?", "hello"])]


@pytest.mark.slow
@pytest.mark.parametrize("role,name,media", REAL, ids=["photos", "sample_data", "whisper", "minilm"])
def test_bf16_matches_fp32_real_weights(role, name, media, monkeypatch):
    if not (REAL_HOME / "models" / name).is_dir():
        pytest.skip(f"{name} is not pulled (mmllm models pull {name})")
    monkeypatch.setenv("MMLLM_IMAGE_RUNTIME", "torch")  # PyTorch's bf16 path (OpenVINO runs fp32: tested below)
    monkeypatch.setenv("MMLLM_TEXT_RUNTIME", "torch")  # PyTorch's autocast (OpenVINO's bf16: tested below)
    items = media()
    fp32, bf16 = pooled(role, name, "fp32", items), pooled(role, name, "bf16", items)
    assert cosine(fp32, bf16).min() >= 0.999


def test_predict_uses_the_checkpoint_precision_unless_given(trained_checkpoint):
    recorded = json.loads((trained_checkpoint / "config.json").read_text())["preprocessing"]["precision"]
    assert recorded == resolve_precision("auto")  # prepared with the default
    stdin = '{"id": "a", "text": "it is big"}\n'
    as_recorded = run_cli("predict", str(trained_checkpoint), "-", input=stdin)
    assert as_recorded.exit_code == 0, as_recorded.output
    how = "bf16 autocast" if recorded == "bf16" else "fp32"
    assert f"frozen encoders: {how}" in as_recorded.stderr and "(as in the checkpoint)" in as_recorded.stderr
    forced = run_cli("predict", str(trained_checkpoint), "-", "--precision", "fp32", input=stdin)
    assert forced.exit_code == 0, forced.output
    assert "frozen encoders: fp32\n" in forced.stderr  # given: no reason added
    assert json.loads(forced.stdout)["prediction"] == json.loads(as_recorded.stdout)["prediction"]


@pytest.mark.slow
@pytest.mark.parametrize("media", [lambda: photos(8), sample_images], ids=["photos", "sample_data"])
def test_openvino_image_runtime_gives_pytorchs_fp32_features(media, monkeypatch):
    """With `openvino` installed, EfficientNet-Lite runs in OpenVINO's fp32 whatever --precision says (faster than
    PyTorch's bf16 on it): the same features as PyTorch's fp32, recorded as runtime openvino, precision fp32, and a
    feature-cache key of their own."""
    pytest.importorskip("openvino")
    if not (REAL_HOME / "models" / "efficientnet-lite0").is_dir():
        pytest.skip("efficientnet-lite0 is not pulled (mmllm models pull efficientnet-lite0)")
    from mmllm.modalities import load_encoder
    from mmllm.features import Preprocessing, feature_key

    items = media()
    monkeypatch.setenv("MMLLM_IMAGE_RUNTIME", "torch")
    torch_enc = load_encoder("image", "efficientnet-lite0", precision="fp32")
    reference, ref_seq = torch_enc.encode(items)
    monkeypatch.delenv("MMLLM_IMAGE_RUNTIME")
    enc = load_encoder("image", "efficientnet-lite0", precision="bf16")
    assert enc.runtime == "openvino" and enc.precision == "fp32" and enc.describe()["runtime"] == "openvino"
    got, seq = enc.encode(items)
    assert cosine(reference, got).min() >= 0.9999 and seq.shape == ref_seq.shape
    pre = Preprocessing.read({})
    assert feature_key("image", "d", enc, pre, 0, "x") != feature_key("image", "d", torch_enc, pre, 0, "x")


def test_openvino_text_runtime_runs_bf16_and_gives_fp32s_states(tiny_models, monkeypatch):
    """With `openvino` installed, a frozen text model in bf16 runs in OpenVINO's bf16 (faster than PyTorch's
    autocast): pooled states within the bf16 tolerance of fp32, recorded as runtime openvino. fp32 stays PyTorch,
    MMLLM_TEXT_RUNTIME=torch turns it off, and trunk states (which OpenVINO does not return) come from PyTorch."""
    pytest.importorskip("openvino")
    name = str(tiny_models["text"])
    reference = load_encoder("text", name, precision="fp32")
    assert reference.runtime == "torch" and reference.describe()["runtime"] == "torch"
    ids = reference.tokenize(TEXTS * 10, 32)["input_ids"]  # 40 texts: two batches of 32, padded to each longest
    monkeypatch.setenv("MMLLM_TEXT_RUNTIME", "torch")
    autocast = load_encoder("text", name, precision="bf16")
    assert autocast.runtime == "torch"
    monkeypatch.delenv("MMLLM_TEXT_RUNTIME")
    small = load_encoder("text", name, precision="bf16")  # a small run never pays OpenVINO's compile
    assert np.array_equal(small.pooled(ids), autocast.pooled(ids)) and small.describe()["runtime"] == "torch"
    import mmllm.encoders as E

    monkeypatch.setattr(E, "OPENVINO_AFTER_TOKENS", 0)  # as a large run, after its first 100k tokens
    seen, compile_it = [], E.openvino_compiled
    monkeypatch.setattr(E, "openvino_compiled", lambda *a, **k: seen.append(a[6]) or compile_it(*a, **k))
    enc = load_encoder("text", name, precision="bf16")
    fp32, got = reference.pooled(ids), enc.pooled(ids)
    assert enc.runtime == "openvino" and enc.describe()["runtime"] == "openvino"
    assert seen == [E.TEXT_OPENVINO_OPTIONS] and E.TEXT_OPENVINO_OPTIONS  # compiled with the measured options
    assert not np.array_equal(fp32, got) and cosine(fp32, got).min() >= 0.999
    assert np.allclose(got[:4], got[4:8], atol=1e-6)  # the same text gives the same states in any batch
    pooled, trunk = enc.pooled_and_trunk(ids, 1)
    assert np.array_equal(pooled, autocast.pooled_and_trunk(ids, 1)[0]) and len(trunk) == len(ids)


@pytest.mark.slow
def test_openvino_minilm_in_bf16_matches_fp32(monkeypatch):
    """The embedded MiniLM in OpenVINO's bf16: measured min cosine 0.99997 to fp32 on 512 fortunes (PyTorch's
    autocast: 0.99996)."""
    pytest.importorskip("openvino")
    if not (REAL_HOME / "models" / "minilm").is_dir():
        pytest.skip("minilm is not pulled (mmllm models pull minilm)")
    texts = ["A cat sits on the mat.", "Stock markets fell sharply on Tuesday.", "What colour is the car?", "hello",
             "Whenever you find yourself on the side of the majority, it is time to pause and reflect."]
    import mmllm.encoders as E

    monkeypatch.setattr(E, "OPENVINO_AFTER_TOKENS", 0)
    enc = load_encoder("text", "minilm", precision="bf16")
    assert cosine(pooled("text", "minilm", "fp32", texts), enc.embed(texts)).min() >= 0.9999
    assert enc.describe()["runtime"] == "openvino"


def test_a_text_model_openvino_cannot_convert_runs_in_pytorch(tiny_models, monkeypatch, capsys):
    """A conversion that fails is one stderr line, and the states come from PyTorch's bf16 autocast."""
    pytest.importorskip("openvino")
    import mmllm.encoders as E

    def refuse(*args, **kwargs):
        raise RuntimeError("unsupported operation")

    monkeypatch.setattr(E, "openvino_compiled", refuse)
    monkeypatch.setattr(E, "OPENVINO_AFTER_TOKENS", 0)
    enc = load_encoder("text", str(tiny_models["text"]), precision="bf16")
    ids = enc.tokenize(TEXTS, 32)["input_ids"]
    got = enc.pooled(ids)
    assert enc.runtime == "torch" and enc.describe()["runtime"] == "torch"
    assert "OpenVINO could not convert it (RuntimeError); it runs in PyTorch" in capsys.readouterr().err
    monkeypatch.setenv("MMLLM_TEXT_RUNTIME", "torch")
    assert np.array_equal(got, load_encoder("text", str(tiny_models["text"]), precision="bf16").pooled(ids))


def test_openvino_cache_takes_hub_names_and_repairs_a_damaged_file(tiny_models, monkeypatch, tmp_path, capsys):
    """A hub identity (org/name@hash) is one file name in the cache, no temporary file is left, and a damaged
    cached file is converted again (found by an attack: FileNotFoundError on every run, 90 MB left each time;
    a truncated .bin made every later run fall back to PyTorch)."""
    pytest.importorskip("openvino")
    import mmllm.encoders as E

    monkeypatch.setenv("MMLLM_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(E, "OPENVINO_AFTER_TOKENS", 0)

    def encoder():
        enc = load_encoder("text", str(tiny_models["text"]), precision="bf16")
        enc.identity = "some-org/tiny-bert@0123456789ab"
        return enc

    enc = encoder()
    ids = enc.tokenize(TEXTS, 32)["input_ids"]
    first = enc.pooled(ids)
    assert enc.describe()["runtime"] == "openvino"
    files = sorted(p.name for p in (tmp_path / "home" / "openvino").iterdir())
    assert files == ["some-org-tiny-bert-0123456789ab-fp32.bin", "some-org-tiny-bert-0123456789ab-fp32.xml"]
    (tmp_path / "home" / "openvino" / files[0]).write_bytes(b"")
    capsys.readouterr()
    again = encoder()
    assert np.allclose(again.pooled(ids), first, atol=1e-6) and again.describe()["runtime"] == "openvino"
    assert "could not be read by OpenVINO: converting the model again" in capsys.readouterr().err
    assert (tmp_path / "home" / "openvino" / files[0]).stat().st_size > 0


def test_importing_openvino_leaves_no_handler_that_closes_a_redirected_stderr():
    """openvino's import creates absl-py's logging handler on the current sys.stderr, and uvicorn's dictConfig (in
    serve) closes every live handler: absl's close() would close a redirected stderr (a notebook's, a test
    runner's). mmllm points that handler at sys.__stderr__, which it never closes."""
    pytest.importorskip("openvino")
    import sys

    from mmllm.encoders import import_openvino

    import_openvino()
    absl = sys.modules.get("absl.logging")
    if absl is None:
        pytest.skip("this openvino does not import absl-py")
    assert absl.get_absl_handler().python_handler.stream is sys.__stderr__
