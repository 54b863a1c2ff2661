"""Standalone metrics: BLEU equals the sacrebleu CLI, FID is right and stable, accuracy from files."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from mmllm.metrics import classification, expected_calibration_error, frechet_distance

HYP = ["the cat sat on the mat", "a quick brown fox jumps", "hello world again", "nothing matches here at all"]
REF1 = ["the cat sat on a mat", "the quick brown fox jumps", "hello world", "completely different words"]
REF2 = ["a cat was sitting on the mat", "a quick brown fox leaped", "hello again world", "nothing matches at all"]


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("tokenize", ["13a", "intl", "char"])
def test_bleu_equals_sacrebleu_cli(tmp_path, tokenize):
    hyp, r1 = write_lines(tmp_path / "h", HYP), write_lines(tmp_path / "r1", REF1)
    r2 = write_lines(tmp_path / "r2", REF2)
    r = run_cli("eval", "bleu", "--hyp", str(hyp), "--ref", str(r1), "--ref", str(r2), "--tokenize", tokenize)
    assert r.exit_code == 0, r.output
    ours = json.loads(r.stdout)
    cli = subprocess.run([sys.executable, "-m", "sacrebleu", str(r1), str(r2), "-i", str(hyp), "-tok", tokenize, "-b"],
                         capture_output=True, text=True, check=True)
    assert round(ours["bleu"], 1) == float(cli.stdout.strip())
    assert f"tok:{tokenize}" in ours["bleu_signature"] and "nrefs:2" in ours["bleu_signature"]
    assert 0 < ours["chrf"] <= 100


def test_bleu_jsonl_and_stdin(tmp_path):
    ref = write_lines(tmp_path / "r.jsonl", [json.dumps({"target": t}) for t in REF1])
    hyp = "\n".join(json.dumps({"id": i, "prediction": h}) for i, h in enumerate(HYP)) + "\n"
    r = run_cli("eval", "bleu", "--hyp", "-", "--ref", str(ref), input=hyp)
    plain = run_cli("eval", "bleu", "--hyp", str(write_lines(tmp_path / "h", HYP)), "--ref",
                    str(write_lines(tmp_path / "r", REF1)))
    assert json.loads(r.stdout)["bleu"] == json.loads(plain.stdout)["bleu"]
    bad = run_cli("eval", "bleu", "--hyp", str(tmp_path / "h"), "--ref", str(write_lines(tmp_path / "short", ["x"])))
    assert bad.exit_code == 2 and "1 lines" in bad.stderr


def reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Independent computation: eigenvalues of sqrt(S1) S2 sqrt(S1)."""
    from scipy.linalg import sqrtm

    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = sqrtm(s1).real
    eig = np.linalg.eigvalsh(root @ s2 @ root)
    mean_term = ((a.mean(0) - b.mean(0)) ** 2).sum()
    return float(mean_term + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(eig, 0, None)).sum())


def test_frechet_distance_matches_reference():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 8)), rng.normal(0.5, 1.3, size=(150, 8))
    ours = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert ours == pytest.approx(reference_fid(a, b), abs=1e-6)
    assert frechet_distance(a.mean(0), np.cov(a, rowvar=False), a.mean(0), np.cov(a, rowvar=False)) == \
        pytest.approx(0, abs=1e-6)


def test_frechet_distance_singular_covariance():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(5, 20))  # N < D: singular covariances
    b = rng.normal(size=(5, 20))
    d = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert np.isfinite(d) and d > 0


def image_set(folder, n, blur=0.0, seed=0):
    from PIL import ImageFilter

    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
        arr[8:24, 8:24] = [200, 40, 40] if i % 2 else [40, 40, 200]
        img = Image.fromarray(arr)
        if blur:
            img = img.filter(ImageFilter.GaussianBlur(blur))
        img.save(folder / f"{i}.png")
    return folder


def test_fid_command_self_zero_and_grows_with_distortion(tmp_path, tiny_models):
    real = image_set(tmp_path / "real", 12)
    fids = []
    for blur in (0.5, 2.0):
        other = image_set(tmp_path / f"blur{blur}", 12, blur=blur)
        r = run_cli("eval", "fid", str(real), str(other), "--image-model", str(tiny_models["image"]))
        assert r.exit_code == 0, r.output
        fids.append(json.loads(r.stdout)["fid"])
    same = json.loads(run_cli("eval", "fid", str(real), str(real), "--image-model", str(tiny_models["image"])).stdout)
    assert abs(same["fid"]) < 1e-6
    assert 0 < fids[0] < fids[1]
    assert same["n_real"] == 12 and same["resolution"] == "32x32" and "not InceptionV3" in same["extractor"]


def test_fid_with_torchscript_extractor(tmp_path):
    class Tiny(torch.nn.Module):  # stands in for inception-2015-12-05.pt: uint8 NCHW in, features out
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.float() / 255.0
            return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)

    path = tmp_path / "tiny.pt"
    torch.jit.script(Tiny()).save(str(path))
    real, gen = image_set(tmp_path / "r", 10), image_set(tmp_path / "g", 10, blur=2.0, seed=3)
    r = run_cli("eval", "fid", str(real), str(gen), "--fid-model", str(path))
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["feature_dim"] == 6 and out["resolution"] == "299x299" and out["comparable_to_published"]
    assert out["fid"] > 0


def test_accuracy_command(tmp_path):
    (tmp_path / "pred.jsonl").write_text("\n".join(json.dumps({"id": i, "prediction": p}) for i, p in
                                                   enumerate(["a", "b", "a", "a"])) + "\n")
    (tmp_path / "gold.csv").write_text("id,label\n0,a\n1,b\n2,b\n3,a\n")
    r = run_cli("eval", "accuracy", "--pred", str(tmp_path / "pred.jsonl"), "--gold", str(tmp_path / "gold.csv"))
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["accuracy"] == 0.75 and out["confusion_matrix"]["matrix"] == [[2, 0], [1, 1]]


def test_classification_and_ece():
    m = classification(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), ["x", "y", "z"])
    assert m["accuracy"] == 0.75 and m["per_class"]["y"]["recall"] == 0.5 and m["per_class"]["z"]["precision"] == 0.5
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    assert expected_calibration_error(probs, np.array([0, 0, 0, 1])) == pytest.approx(0.5 * 0.1 + 0.5 * 0.1)
