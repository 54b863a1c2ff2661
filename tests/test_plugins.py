"""Modalities are plug-ins (issue 22): no core module spells a modality, and a modality registered from a test
module runs through prepare -> finetune -> eval -> predict with no file of mmllm/ edited."""

import ast
import dataclasses
import hashlib
import inspect
import io
import json
import tokenize
from pathlib import Path

import numpy as np
import pytest

from conftest import write_csv
from mmllm import modalities
from mmllm.modalities import Modality, Option

PACKAGE = Path(__file__).resolve().parent.parent / "mmllm"
MODALITY_NAMES = {"image", "audio", "video"}
TASK_NAMES = {"classify", "generate"}
# where a modality's name is not a plug-in's business: the external formats' own spellings (LLaVA's "<image>",
# ShareGPT's "images", OpenAI's "image_url"), the embedded models' table (which role each alias serves) and
# FID, which is defined on images
MODALITY_ALLOWED = {"conversations.py", "hub.py", "scoring.py"}
# the task plug-ins are not done yet (issue 22, second half): these modules still name a task. The set must
# only shrink: a module added here, or one that no longer names a task and is still listed, fails the test
TASK_SPELLED = {"checkpoint.py", "config.py", "evaluation.py", "modelcard.py", "predict.py", "records.py",
                "serve.py", "tasks/__init__.py", "tasks/classify.py", "tasks/generate.py"}


def named(path: Path, names: set[str]) -> list[str]:
    """`path:line: value` of each string literal that is one of `names` or a comma list holding one."""
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type != tokenize.STRING:
            continue
        try:
            value = ast.literal_eval(tok.string)
        except (ValueError, SyntaxError):
            continue  # an f-string
        if isinstance(value, str) and " " not in value and set(value.split(",")) & names:
            out.append(f"{path.relative_to(PACKAGE)}:{tok.start[0]}: {value!r}")
    return out


def test_no_core_module_names_a_modality():
    found = [hit for p in sorted(PACKAGE.rglob("*.py")) if p.parent.name != "modalities"
             and p.name not in MODALITY_ALLOWED for hit in named(p, MODALITY_NAMES)]
    assert not found, "\n".join(found)
    assert named(PACKAGE / "modalities" / "image.py", MODALITY_NAMES)  # the check sees what it looks for


def test_the_modules_that_still_name_a_task_only_shrink():
    spelled = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if named(p, TASK_NAMES)}
    assert spelled == TASK_SPELLED, (sorted(spelled - TASK_SPELLED), sorted(TASK_SPELLED - spelled))


class SpectrumEncoder:
    """A fixed random projection of a 1-D spectrum, (B, 32) pooled and (B, 4, 32) tokens."""

    def __init__(self, name: str):
        self.name, self.precision, self.dim = name, "fp32", 32
        self.identity = "toy-spectrum:" + hashlib.sha256(name.encode()).hexdigest()[:12]
        self.weights = np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32) / 8

    def encode(self, items: list) -> tuple[np.ndarray, list]:
        tokens = np.stack([np.stack([x[i * 16:(i + 1) * 16] @ self.weights[i * 16:(i + 1) * 16] for i in range(4)])
                           for x in items])
        return tokens.mean(1), list(tokens)

    def describe(self) -> dict:
        return {"name": self.name, "identity": self.identity, "dim": self.dim, "precision": self.precision,
                "preprocessing": {"bins": 64}}


class Spectrum(Modality):
    """A toy modality: a .npy file holding a 64-bin spectrum, scaled by --spectrum-gain."""

    name = "spectrum"
    columns = ("spectrum", "spectrum_path")
    extensions = frozenset({".npy"})
    default_model = "toy"
    model_help = "Spectrum encoder (any name: a fixed random projection)."
    options = (Option("spectrum_gain", 1.0, "Multiply each spectrum by this.", low=0, high=100),)
    seq_len = 4

    def load_encoder(self, name, trust_remote_code=False, precision="fp32"):
        return SpectrumEncoder(name)

    def decode(self, media, encoder, pre):
        from mmllm.media import MediaError

        data = media if isinstance(media, bytes) else Path(media).read_bytes()
        try:
            x = np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32).reshape(-1)
        except Exception:
            raise MediaError("not a .npy spectrum") from None
        if x.size != 64:
            raise MediaError(f"a spectrum has 64 bins, not {x.size}")
        return x * pre.option("spectrum_gain")

    def key_parts(self, pre):
        return {"gain": pre.option("spectrum_gain")}


@pytest.fixture
def spectrum():
    modality = modalities.register(Spectrum())
    yield modality
    modalities.unregister("spectrum")


def test_a_modality_registered_here_runs_prepare_finetune_eval_predict(spectrum, tmp_path):
    import mmllm
    from mmllm.config import PrepareConfig

    assert {"spectrum_column", "spectrum_model", "spectrum_gain"} <= {f.name for f in
                                                                       dataclasses.fields(PrepareConfig)}
    assert "spectrum_gain" in inspect.signature(mmllm.prepare).parameters
    rng = np.random.default_rng(1)
    rows = []
    for i in range(60):
        label = ("low", "high")[i % 2]
        x = rng.normal(0, 0.2, 64)
        x[:32 if label == "low" else 64][-32:] += 2.0  # energy in the low or the high half
        np.save(tmp_path / f"s{i}.npy", x)
        rows.append({"id": f"s{i}", "spectrum": f"s{i}.npy", "label": label,
                     "split": ["train", "train", "train", "validation", "test"][i % 5]})
    rows.append({"id": "bad", "spectrum": "s0.npy.txt", "label": "low", "split": "train"})
    (tmp_path / "s0.npy.txt").write_text("no")
    manifest = write_csv(tmp_path / "m.csv", rows)
    summary = mmllm.prepare(manifest, tmp_path / "p", spectrum_gain=2.0, sequence_features=True, quiet=True)
    assert summary["skipped"] == 1
    meta = json.loads((tmp_path / "p" / "mmllm-prepared.json").read_text())
    assert meta["preprocessing"]["spectrum_gain"] == 2.0 and "spectrum" in meta["modalities"]
    mmllm.finetune(tmp_path / "p", tmp_path / "ck", epochs=20, hidden_size=16, quiet=True)
    metrics = mmllm.evaluate(tmp_path / "ck", tmp_path / "p", split="test", quiet=True)
    assert metrics["accuracy"] >= 0.9, metrics
    raw = mmllm.evaluate(tmp_path / "ck", manifest, split="test", quiet=True)  # raw records, featurized again
    assert raw["accuracy"] == metrics["accuracy"]
    seq = mmllm.finetune(tmp_path / "p", tmp_path / "ck_seq", fusion="attention", epochs=2, hidden_size=16, quiet=True)
    assert json.loads((tmp_path / "ck_seq" / "config.json").read_text())["model"]["sequence"], seq  # its 4 tokens
    model = mmllm.load(tmp_path / "ck", quiet=True)
    got = model.predict([{"id": "q", "spectrum": str(tmp_path / "s1.npy")},
                         {"id": "r", "spectrum": (tmp_path / "s2.npy").read_bytes()}])
    assert [g["prediction"] for g in got] == ["high", "low"]


def test_an_option_of_a_plug_in_is_validated_and_leaves_with_it(spectrum):
    from mmllm import config as C

    cfg = C.PrepareConfig(input=["m.csv"], output="o", spectrum_gain=500.0)
    assert any("--spectrum-gain: must be in (0, 100]" in p for p in C.validate(cfg))
    modalities.unregister("spectrum")
    assert "spectrum_gain" not in {f.name for f in dataclasses.fields(C.PrepareConfig)}
    modalities.register(spectrum)
