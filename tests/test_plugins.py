"""Modalities and tasks are plug-ins (issue 22): no core module spells a modality or a task, and a modality and a
task registered from this test module run through prepare -> finetune -> eval -> predict with no file of mmllm/
edited."""

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
from mmllm import modalities, tasks
from mmllm.modalities import Modality, Option
from mmllm.tasks import Task, Training

PACKAGE = Path(__file__).resolve().parent.parent / "mmllm"
MODALITY_NAMES = {"image", "audio", "video"}
TASK_NAMES = {"classify", "generate"}
# where a modality's name is not a plug-in's business: the external formats' own spellings (LLaVA's "<image>",
# ShareGPT's "images", OpenAI's "image_url"), the embedded models' table (which role each alias serves) and
# FID, which is defined on images
MODALITY_ALLOWED = {"conversations.py", "hub.py", "scoring.py"}
# a task is named only by its own plug-in package (tasks/<name>/) and by the registry, for its built-ins and the
# default task (tasks/__init__.py)
TASK_ALLOWED = {"tasks/__init__.py"}

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


def test_no_core_module_names_a_task():
    def plug_in(p: Path) -> bool:
        rel = p.relative_to(PACKAGE)
        return len(rel.parts) == 3 and rel.parts[0] == "tasks"  # tasks/<name>/<module>.py

    found = [hit for p in sorted(PACKAGE.rglob("*.py")) if not plug_in(p)
             and str(p.relative_to(PACKAGE)) not in TASK_ALLOWED for hit in named(p, TASK_NAMES)]
    assert not found, "\n".join(found)
    assert named(PACKAGE / "tasks" / "generate" / "__init__.py", TASK_NAMES)  # the check sees what it looks for

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


class CentroidTable:
    """Pooled features of one modality and label ids: what the loop batches."""

    def __init__(self, columns: dict, modality: str, labels: list[str]):
        import torch

        self.x = torch.as_tensor(np.asarray(columns[f"{modality}_emb"], dtype=np.float32))
        ids = {n: i for i, n in enumerate(labels)}
        self.y = torch.tensor([ids.get(lab, -100) for lab in columns["label"]])

    def __len__(self) -> int:
        return len(self.x)

    def batch(self, idx, device="cpu") -> dict:
        idx = list(idx)
        return {"x": self.x[idx].to(device), "labels": self.y[idx].to(device)}


def centroid_model(n_labels: int, dim: int, scale: float):
    import torch

    class Centroids(torch.nn.Module):
        """Nearest class centroid: logits are -scale * squared distances to a learnt centroid per class."""

        def __init__(self):
            super().__init__()
            self.centroids = torch.nn.Parameter(torch.zeros(n_labels, dim))

        def backbone_parameters(self) -> list:
            return []

        def forward(self, batch: dict) -> dict:
            logits = -scale * torch.cdist(batch["x"], self.centroids) ** 2
            out = {"logits": logits}
            if "labels" in batch:
                out["loss"] = torch.nn.functional.cross_entropy(logits, batch["labels"], ignore_index=-100)
            return out

    return Centroids()


class Centroid(Task):
    """A toy task: a nearest-centroid classifier over the pooled features of the first prepared medium, with its
    own option (--centroid-scale), rule, checkpoint, prediction output, eval metric and model card section."""

    name = "centroid"
    help = "centroid (label column, nearest class centroid)"
    kind = "nearest-centroid classifier"
    learns = "label"
    flag = "--label-column"
    metrics = ("val_loss", "val_hits")
    defaults = {"budget_steps": 200, "min_steps": 20, "min_rel_delta": 0.0}
    options = (Option("centroid_scale", 1.0, "Sharpness of the centroid logits (--task centroid)."),)

    def rules(self, cfg, mods, explicit):
        return [] if cfg.centroid_scale > 0 else [f"--centroid-scale: must be > 0 (got {cfg.centroid_scale})"]

    def has_column(self, meta):
        return bool(meta.get("labels"))

    def build(self, cfg, data, meta, mods, dist):
        import torch

        from mmllm.checkpoint import FORMAT, VERSION, write_marker
        from mmllm.modelcard import write

        medium = next(m for m in mods if m != modalities.TEXT)
        labels = meta["labels"]
        train, val = (CentroidTable(data[s].with_format("numpy")[:] | {"label": label_names(data[s])}, medium,
                                    labels) for s in ("train", "validation"))
        model = centroid_model(len(labels), meta["encoders"][medium]["dim"], cfg.centroid_scale)

        def validate(m):
            with torch.no_grad():
                out = m(val.batch(range(len(val))))
            return {"val_loss": float(out["loss"]),
                    "val_hits": float((out["logits"].argmax(1) == val.y).float().mean())}

        def save(m, out, metrics):
            write_marker(out)
            config = {"format": FORMAT, "version": VERSION, "task": self.name, "labels": labels,
                      "model": {"modalities": [medium]}, "encoders": {medium: meta["encoders"][medium]},
                      "columns": meta["columns"], "preprocessing": meta["preprocessing"], "metrics": metrics,
                      "scale": cfg.centroid_scale, "centroids": m.centroids.detach().tolist()}
            (out / "config.json").write_text(json.dumps(config))
            write(out, config)

        return Training(model, train, validate, save)

    def check(self, config, folder):
        c = config.get("centroids")
        return [] if isinstance(c, list) and len(c) == len(config["labels"]) else ["centroids: one per label"]

    def load(self, folder, config, device):
        import torch

        model = centroid_model(len(config["labels"]), len(config["centroids"][0]), config["scale"])
        model.centroids.data = torch.tensor(config["centroids"])
        return model.eval(), None

    def predict(self, predictor, rows, top_k, reliance, generation):
        import torch

        medium = predictor.config["model"]["modalities"][0]
        x = torch.tensor(np.stack([r[f"{medium}_emb"] for r in rows]), dtype=torch.float32)
        with torch.no_grad():
            best = predictor.model({"x": x})["logits"].argmax(1)
        return {r["id"]: {"nearest": predictor.labels[int(b)]} for r, b in zip(rows, best)}

    def evaluate(self, cfg, config, device):
        import torch

        from mmllm.features import split_columns

        model, _ = self.load(cfg.checkpoint, config, device)
        medium = config["model"]["modalities"][0]
        columns, source, split = split_columns(cfg, config, [medium])
        table = CentroidTable(columns, medium, config["labels"])
        with torch.no_grad():
            hits = (model(table.batch(range(len(table))))["logits"].argmax(1) == table.y).float().mean()
        return {"task": self.name, "checkpoint": str(cfg.checkpoint), "data": source, "split": split,
                "n": len(table), "hits": float(hits)}

    def card_files(self, config):
        return {"config.json#centroids": "the learnt class centroids"}


def label_names(split) -> list:
    from mmllm.features import label_strings

    return label_strings(split)


@pytest.fixture
def centroid():
    task = tasks.register(Centroid())
    yield task
    tasks.unregister("centroid")


def test_a_task_registered_here_runs_prepare_finetune_eval_predict(spectrum, centroid, tmp_path):
    import mmllm
    from mmllm import config as C

    assert "centroid_scale" in {f.name for f in dataclasses.fields(C.FinetuneConfig)}
    assert "centroid_scale" in inspect.signature(mmllm.finetune).parameters
    assert "centroid" in next(f for f in dataclasses.fields(C.FinetuneConfig) if f.name == "task").metadata["choices"]
    assert C.FinetuneConfig(task="centroid").budget_steps == 200  # the task's default for a shared option
    assert any("--centroid-scale: must be > 0" in p for p in C.finetune_rules(C.FinetuneConfig(task="centroid",
                                                                                                  centroid_scale=0)))
    assert any("--fusion: only used by --task classify" in p   # another task's option is refused, and ours there
               for p in C.finetune_rules(C.FinetuneConfig(task="centroid", fusion="gated")))
    assert any("--centroid-scale: only used by --task centroid" in p
               for p in C.finetune_rules(C.FinetuneConfig(centroid_scale=2.0)))
    rng = np.random.default_rng(2)
    rows = []
    for i in range(50):
        label = ("low", "high")[i % 2]
        x = rng.normal(0, 0.2, 64)
        x[:32 if label == "low" else 64][-32:] += 2.0
        np.save(tmp_path / f"s{i}.npy", x)
        rows.append({"id": f"s{i}", "spectrum": f"s{i}.npy", "label": label,
                     "split": ["train", "train", "train", "validation", "test"][i % 5]})
    manifest = write_csv(tmp_path / "m.csv", rows)
    mmllm.prepare(manifest, tmp_path / "p", quiet=True)
    summary = mmllm.finetune(tmp_path / "p", tmp_path / "ck", task="centroid", centroid_scale=0.5, monitor="val_hits",
                             lr=0.05, quiet=True)
    assert summary["monitor"] == "val_hits" and summary["val_hits"] >= 0.9, summary
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["task"] == "centroid" and config["scale"] == 0.5
    card = (tmp_path / "ck" / "README.md").read_text()
    assert "nearest-centroid classifier trained with mmllm (`--task centroid`)" in card
    assert "config.json#centroids" in card  # the task's own files row
    prepared = mmllm.evaluate(tmp_path / "ck", tmp_path / "p", split="test", quiet=True)
    raw = mmllm.evaluate(tmp_path / "ck", manifest, split="test", quiet=True)  # raw records, featurized again
    assert prepared["task"] == "centroid" and prepared["n"] == 10 and prepared["hits"] >= 0.9, prepared
    assert raw["hits"] == prepared["hits"]
    model = mmllm.load(tmp_path / "ck", quiet=True)
    got = model.predict([{"id": "q", "spectrum": str(tmp_path / "s1.npy")},
                         {"id": "r", "spectrum": (tmp_path / "s2.npy").read_bytes()},
                         {"id": "bad", "spectrum": b"no"}])
    assert [g.get("nearest") for g in got[:2]] == ["high", "low"] and "error" in got[2], got


def test_a_task_leaves_with_its_options(centroid):
    from mmllm import config as C

    tasks.unregister("centroid")
    assert "centroid_scale" not in {f.name for f in dataclasses.fields(C.FinetuneConfig)}
    assert "centroid" not in next(f for f in dataclasses.fields(C.FinetuneConfig) if f.name == "task").metadata[
        "choices"]
    assert C.FinetuneConfig().fusion == "auto" and C.FinetuneConfig(task="generate").decoder  # the others stay
    tasks.register(centroid)


def test_mmllm_plugins_loads_a_users_module_before_the_flags_are_built(tmp_path):
    """MMLLM_PLUGINS=module: the CLI imports it first, so its modality's flags are in `prepare --help`; a module
    that cannot be imported is one line and exit 2."""
    import os
    import subprocess
    import sys

    (tmp_path / "my_plugin.py").write_text(
        "from mmllm import modalities\nfrom mmllm.modalities import Modality, Option\n\n\n"
        "class Bands(Modality):\n    name = 'bands'\n    columns = ('bands',)\n"
        "    options = (Option('band_count', 8, 'Bands kept.', low=0, high=64),)\n\n\n"
        "modalities.register(Bands())\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(PACKAGE.parent)]),
           "MMLLM_PLUGINS": "my_plugin", "COLUMNS": "200"}
    cli = [sys.executable, "-m", "mmllm"]
    r = subprocess.run([*cli, "prepare", "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--band-count" in r.stdout and "--bands-column" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([*cli, "--help"], env={**env, "MMLLM_PLUGINS": "my_plugin,not_there"}, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: MMLLM_PLUGINS: cannot import 'not_there' (ModuleNotFoundError: No module named 'not_there')"]
