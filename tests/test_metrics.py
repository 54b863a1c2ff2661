"""Metrics equal their reference implementations: BLEU the sacrebleu CLI, F1 scikit-learn, WER/CER jiwer,
FID pytorch-fid's algorithm, ECE a direct re-implementation; each output names its definition."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import one_line_error, run_cli
from mmllm.metrics import classification, error_rates, expected_calibration_error, frechet_distance

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
    assert not same["comparable_to_published"] and "not comparable to published FID" in same["fid_note"]


def test_fid_checks_both_inputs_before_featurizing(tmp_path, tiny_models, monkeypatch):
    """A bad GENERATED is one line before any image of REAL is featurized (or any extractor loads)."""
    real = image_set(tmp_path / "real", 3)
    (tmp_path / "empty").mkdir()
    image_set(tmp_path / "one", 1)

    def featurized(*args, **kwargs):
        raise AssertionError("an extractor was loaded before both inputs were checked")

    monkeypatch.setattr("mmllm.modalities.load_encoder", featurized)
    for name, reason in (("missing", "not found"), ("empty", "no images found"), ("one", "need at least 2 images")):
        r = run_cli("eval", "fid", str(real), str(tmp_path / name), "--image-model", str(tiny_models["image"]))
        line = one_line_error(r)
        assert reason in line and str(tmp_path / name) in line, line


class StandInInception(torch.nn.Module):
    """Stands in for inception-2015-12-05.pt: uint8 NCHW 299x299 in; 24-d "pool" features with
    return_features=True, 10 class probabilities otherwise (different sizes: using the wrong one fails)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("proj", torch.randn(12, 24, generator=g))
        self.register_buffer("head", torch.randn(24, 10, generator=g))

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if img.dtype != torch.uint8 or img.shape[1] != 3 or img.shape[2] != 299 or img.shape[3] != 299:
            raise ValueError("expected uint8 NCHW 299x299")
        x = img.float() / 255.0
        stats = torch.cat([x.mean((2, 3)), x.std((2, 3)), x[:, :, :150].mean((2, 3)), x[:, :, :, :150].mean((2, 3))], 1)
        feats = torch.tanh(stats @ self.proj)  # (N, 24)
        if return_features:
            return feats
        return torch.softmax(feats @ self.head, 1)  # (N, 10)


class NoFeatures(torch.nn.Module):
    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return img.float().mean((2, 3))


def direct_features(net, folder) -> np.ndarray:
    images = [Image.open(f).convert("RGB").resize((299, 299), Image.BICUBIC) for f in sorted(folder.glob("*.png"))]
    x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).contiguous()
    return net(x, return_features=True).double().numpy()


def test_fid_with_torchscript_extractor_uses_pool_features(tmp_path):
    path = tmp_path / "inception.pt"
    net = torch.jit.script(StandInInception())
    net.save(str(path))
    real, gen = image_set(tmp_path / "r", 30), image_set(tmp_path / "g", 30, blur=2.0, seed=3)
    r = run_cli("eval", "fid", str(real), str(gen), "--fid-model", str(path))
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["feature_dim"] == 24 and out["resolution"] == "299x299"  # the 10-d plain output was not used
    a, b = direct_features(net, real), direct_features(net, gen)
    assert out["fid"] == pytest.approx(reference_fid(a, b), rel=1e-6, abs=1e-9) and out["fid"] > 0
    assert "uint8 NCHW" in out["fid_preprocessing"] and "299x299" in out["fid_preprocessing"]
    assert out["fid_definition"].startswith("||mu_r - mu_g||^2")
    # not the 2048-d Inception pool3: the output says so instead of claiming a published-comparable number
    assert not out["comparable_to_published"] and "not comparable to published FID" in out["fid_note"]


def test_fid_model_labels_2048_pool3_as_comparable():
    from mmllm.config import FidConfig
    from mmllm.scoring import fid_extractor

    d = fid_extractor(FidConfig(real="r", generated="g", fid_model="inception-2015-12-05.pt"), 2048, "299x299")
    assert d["comparable_to_published"] and d["fid_features"] == "inception pool3 2048" and "fid_note" not in d


def test_fid_model_without_return_features_refused(tmp_path):
    path = tmp_path / "plain.pt"
    torch.jit.script(NoFeatures()).save(str(path))
    real = image_set(tmp_path / "r", 3)
    r = run_cli("eval", "fid", str(real), str(real), "--fid-model", str(path))
    assert r.exit_code == 2 and "return_features" in r.stderr and "inception-2015-12-05.pt" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_accuracy_command(tmp_path):
    (tmp_path / "pred.jsonl").write_text("\n".join(json.dumps({"id": i, "prediction": p}) for i, p in
                                                   enumerate(["a", "b", "a", "a"])) + "\n")
    (tmp_path / "gold.csv").write_text("id,label\n0,a\n1,b\n2,b\n3,a\n")
    r = run_cli("eval", "accuracy", "--pred", str(tmp_path / "pred.jsonl"), "--gold", str(tmp_path / "gold.csv"))
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["accuracy"] == 0.75 and out["confusion_matrix"]["matrix"] == [[2, 0], [1, 1]]


def test_accuracy_reads_csv_tsv_and_parquet_by_column(tmp_path):
    """The header row of a CSV/TSV names the columns: it is not a prediction or a gold label."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "pred.csv").write_text("id,prediction\n0,a\n1,b\n2,a\n3,a\n")
    (tmp_path / "gold.tsv").write_text("id\tlabel\n0\ta\n1\tb\n2\tb\n3\ta\n")
    pq.write_table(pa.table({"guess": ["a", "b", "a", "a"]}), tmp_path / "pred.parquet")
    for pred, extra in (("pred.csv", []), ("pred.parquet", ["--pred-field", "guess"])):
        r = run_cli("eval", "accuracy", "--pred", str(tmp_path / pred), "--gold", str(tmp_path / "gold.tsv"), *extra)
        assert r.exit_code == 0, r.output
        out = json.loads(r.stdout)
        assert out["n"] == 4 and out["accuracy"] == 0.75 and out["confusion_matrix"]["labels"] == ["a", "b"]
    line = one_line_error(run_cli("eval", "accuracy", "--pred", str(tmp_path / "pred.csv"), "--gold",
                                  str(tmp_path / "gold.tsv"), "--pred-field", "label"))
    assert f"--pred {tmp_path / 'pred.csv'}: no column 'label'" in line and "id, prediction" in line
    (tmp_path / "ragged.csv").write_text("id,prediction\n0,a\n1,b,extra\n2,a\n3,a\n")
    line = one_line_error(run_cli("eval", "accuracy", "--pred", str(tmp_path / "ragged.csv"), "--gold",
                                  str(tmp_path / "gold.tsv")))
    assert "ragged.csv, row 3" in line


def test_accuracy_plain_lines_are_all_labels(tmp_path):
    """Outside CSV/TSV/Parquet/JSONL every line is a label: a first line 'label' is a label, not a header."""
    (tmp_path / "pred.txt").write_text("label\na\nb\n")
    (tmp_path / "gold.txt").write_text("label\na\na\n")
    r = run_cli("eval", "accuracy", "--pred", str(tmp_path / "pred.txt"), "--gold", str(tmp_path / "gold.txt"))
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["n"] == 3


def test_classification_and_ece():
    m = classification(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), ["x", "y", "z"])
    assert m["accuracy"] == 0.75 and m["per_class"]["y"]["recall"] == 0.5 and m["per_class"]["z"]["precision"] == 0.5
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    assert expected_calibration_error(probs, np.array([0, 0, 0, 1])) == pytest.approx(0.5 * 0.1 + 0.5 * 0.1)


# ---------------------------------------------------------------- classification == scikit-learn

@st.composite
def labelled(draw):
    """(gold, pred, n_classes): random classes, so some are only predicted and some have no support."""
    n = draw(st.integers(1, 6))
    size = draw(st.integers(1, 30))
    gold = draw(st.lists(st.integers(0, n - 1), min_size=size, max_size=size))
    pred = draw(st.lists(st.integers(0, n - 1), min_size=size, max_size=size))
    return np.array(gold), np.array(pred), n


@pytest.mark.filterwarnings("ignore:A single label was found")
@settings(max_examples=400, deadline=None)
@given(labelled())
def test_classification_equals_sklearn(case):
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    gold, pred, n = case
    names = [f"c{i}" for i in range(n)]
    union = classification(gold, pred, names)
    every = classification(gold, pred, names, f1_labels="all")
    assert union["accuracy"] == pytest.approx(accuracy_score(gold, pred))
    assert union["macro_f1"] == pytest.approx(f1_score(gold, pred, average="macro", zero_division=0), abs=1e-12)
    assert every["macro_f1"] == pytest.approx(
        f1_score(gold, pred, labels=list(range(n)), average="macro", zero_division=0), abs=1e-12)
    assert union["macro_f1_classes"] == len(set(gold) | set(pred)) and every["macro_f1_classes"] == n
    p, r, f, support = precision_recall_fscore_support(gold, pred, labels=list(range(n)), zero_division=0)
    for i, name in enumerate(names):
        c = union["per_class"][name]
        assert (c["precision"], c["recall"], c["f1"], c["support"]) == pytest.approx((p[i], r[i], f[i], support[i]))
    assert union["confusion_matrix"]["matrix"] == confusion_matrix(gold, pred, labels=list(range(n))).tolist()


def test_macro_f1_counts_classes_only_predicted():
    m = classification(np.array([0, 0, 1, 1]), np.array([0, 2, 1, 1]), ["a", "b", "c"])
    assert m["macro_f1"] == pytest.approx(5 / 9)  # scikit-learn: (2/3 + 1 + 0) / 3 = 0.556, not 0.833
    assert m["macro_f1_labels"] == "union of gold and predicted" and m["zero_division"] == 0
    assert "2TP/(2TP+FP+FN)" in m["macro_f1_definition"]
    # a class the checkpoint knows but nobody used counts only with f1_labels="all"
    m4 = classification(np.array([0, 0, 1, 1]), np.array([0, 2, 1, 1]), ["a", "b", "c", "d"], f1_labels="all")
    assert m4["macro_f1"] == pytest.approx(5 / 12) and m4["macro_f1_labels"] == "all classes of the checkpoint"
    # records with gold < 0 (unlabelled) are ignored
    assert classification(np.array([0, -100, 1]), np.array([0, 1, 1]), ["a", "b"])["n"] == 2


# ---------------------------------------------------------------- ECE == direct re-implementation

def reference_ece(probs: np.ndarray, gold: np.ndarray, n_bins: int = 15) -> float:
    """Guo et al. 2017 written out: bin k holds confidences in (k/B, (k+1)/B]."""
    conf, hit = probs.max(1), (probs.argmax(1) == gold).astype(float)
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    total = 0.0
    for k in range(n_bins):
        sel = bins == k
        if sel.sum():
            total += sel.sum() / len(conf) * abs(hit[sel].mean() - conf[sel].mean())
    return total


@pytest.mark.parametrize("seed", range(200))
def test_ece_equals_reference(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(1, 300)), int(rng.integers(2, 12))
    probs = rng.dirichlet(np.full(k, rng.uniform(0.1, 3.0)), size=n)
    gold = rng.integers(0, k, size=n)
    assert expected_calibration_error(probs, gold) == pytest.approx(reference_ece(probs, gold), abs=1e-12)
    m = classification(gold, probs.argmax(1), [str(i) for i in range(k)], probs)
    assert m["ece"] == pytest.approx(reference_ece(probs, gold), abs=1e-12)
    assert m["ece_definition"].startswith("equal-width, 15 bins, top-label confidence")


# ---------------------------------------------------------------- FID == pytorch-fid's algorithm

def pytorch_fid_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid's calculate_frechet_distance (fid_score.py), as published."""
    from scipy import linalg

    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


@pytest.mark.parametrize("seed", range(30))
def test_frechet_distance_equals_pytorch_fid(seed):
    rng = np.random.default_rng(seed)
    d = int(rng.integers(2, 24))
    a = rng.normal(size=(int(rng.integers(d + 2, 80)), d)) @ rng.normal(size=(d, d))
    b = rng.normal(rng.normal(), rng.uniform(0.5, 2), size=(int(rng.integers(d + 2, 80)), d))
    stats = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    expected = pytorch_fid_distance(*stats)
    assert frechet_distance(*stats) == pytest.approx(expected, rel=1e-7, abs=1e-7)
    assert frechet_distance(*stats) == pytest.approx(reference_fid(a, b), rel=1e-5, abs=1e-5)


# ---------------------------------------------------------------- WER / CER == jiwer

sentences = st.lists(st.lists(st.sampled_from(["the", "cat", "sat", "on", "a", "mat", "Mat", "mat."]), max_size=8)
                     .map(" ".join), min_size=1, max_size=6)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_error_rates_equal_jiwer(data):
    import jiwer

    refs = data.draw(sentences)
    hyps = data.draw(st.lists(st.sampled_from(["the cat", "", "a  mat", "the cat sat on the mat", "cat sat"]),
                              min_size=len(refs), max_size=len(refs)))
    out = error_rates(hyps, refs)
    assert out["wer"] == pytest.approx(jiwer.wer(refs, hyps)) and out["cer"] == pytest.approx(jiwer.cer(refs, hyps))
    assert out["n"] == len(refs) and "jiwer" in out["wer_definition"] and "characters" in out["cer_definition"]


def test_wer_command(tmp_path):
    import jiwer

    refs = ["the cat sat on the mat", "hello world", "a b c d"]
    hyps = ["the cat sat on mat", "hello there world", "a b x d"]
    h, r = write_lines(tmp_path / "h.txt", hyps), write_lines(tmp_path / "r.txt", refs)
    out = run_cli("eval", "wer", "--hyp", str(h), "--ref", str(r))
    assert out.exit_code == 0, out.output
    res = json.loads(out.stdout)
    assert res["wer"] == pytest.approx(jiwer.wer(refs, hyps)) == pytest.approx(3 / 12)
    assert res["cer"] == pytest.approx(jiwer.cer(refs, hyps)) and res["n"] == 3
    assert {"wer_definition", "cer_definition"} <= set(res)
    jl = write_lines(tmp_path / "r.jsonl", [json.dumps({"id": i, "target": t}) for i, t in enumerate(refs)])
    stdin = "\n".join(json.dumps({"prediction": x}) for x in hyps) + "\n"
    assert json.loads(run_cli("eval", "wer", "--hyp", "-", "--ref", str(jl), input=stdin).stdout)["wer"] == res["wer"]
    short = run_cli("eval", "wer", "--hyp", str(h), "--ref", str(write_lines(tmp_path / "s", ["x"])))
    assert short.exit_code == 2 and "1 lines" in short.stderr
    missing = run_cli("eval", "wer", "--hyp", str(h))
    assert missing.exit_code == 2 and "--ref" in missing.stderr


def test_collapse_flags_one_answer_the_references_do_not_share():
    from mmllm.metrics import collapse

    refs = [f"name {i}" for i in range(10)]
    found = collapse(["frog"] * 7 + ["a", "b", "c"], refs)  # the emoji defaults' failure: "frog" for most pictures
    assert found["answer"] == "frog" and found["count"] == 7 and found["share"] == 0.7
    assert found["reference_share"] == 0.0 and "twice" in found["definition"]
    assert collapse(["frog"] * 4 + list("abcdef"), refs) is None  # under half
    assert collapse(["x"] * 9, refs[:9]) is None  # fewer than 10 records: too few to say
    balanced = ["b", "s"] * 10
    assert collapse(["b"] * 20, balanced)["share"] == 1.0  # one class of two balanced ones: 2x its share
    majority = ["b"] * 16 + ["s"] * 4
    assert collapse(["b"] * 20, majority)["reference_share"] == 0.8  # only the majority class, never the other
    assert collapse(["b"] * 18 + ["s"] * 2, majority) is None  # the references' own mix, nearly: not collapsed
    assert collapse(list(balanced), balanced) is None
    assert collapse([" frog "] * 10, ["frog"] * 10) is None  # the references are one answer too
    assert collapse(["b"] * 12, ["b", None] * 6) is None  # unlabelled pairs left out: 6 records


def test_eval_model_reports_a_classifier_that_collapsed(trained_checkpoint, monkeypatch):
    """A classifier that gives every record the same class: eval's result says so ("collapsed") and stderr has one
    warning line; the metrics are the same as they are without the check."""
    from mmllm.tasks.classify import core as classify

    data = trained_checkpoint.parent / "p"
    plain = run_cli("eval", "model", str(trained_checkpoint), str(data), "--split", "train", "--no-reliance")
    assert plain.exit_code == 0, plain.output
    real = classify.predict_table

    def one_class(model, table, *args, **kwargs):
        probs, gold, gates = real(model, table, *args, **kwargs)
        constant = np.zeros_like(probs)
        constant[:, 0] = 1.0
        return constant, gold, gates

    monkeypatch.setattr(classify, "predict_table", one_class)
    r = run_cli("eval", "model", str(trained_checkpoint), str(data), "--split", "train", "--no-reliance")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    labels = json.loads((trained_checkpoint / "config.json").read_text())["labels"]
    assert result["collapsed"]["answer"] == labels[0] and result["collapsed"]["share"] == 1.0
    assert result["n"] >= 10 and 0 < result["collapsed"]["reference_share"] < 1
    warning = [line for line in r.stderr.splitlines() if "collapsed" in line]
    assert len(warning) == 1 and warning[0].startswith("warning:") and repr(labels[0]) in warning[0]
    assert result["accuracy"] == pytest.approx(result["collapsed"]["reference_share"])
