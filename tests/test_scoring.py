"""`eval model` names the definition of each number: macro-F1 labels, ECE binning, WER/CER (== jiwer)."""

import json

import pytest

from conftest import run_cli, tiny_prepare_args


@pytest.fixture
def prepared(tiny_models, toy_manifest, tmp_path):
    out = tmp_path / "prepared"
    r = run_cli(*tiny_prepare_args(tiny_models, toy_manifest, out), "--max-text-tokens", "32")
    assert r.exit_code == 0, r.output
    return out


def test_eval_model_classification_names_definitions(prepared, tmp_path):
    ck = tmp_path / "ck"
    r = run_cli("finetune", str(prepared), "--output", str(ck), "--epochs", "1", "--hidden-size", "16")
    assert r.exit_code == 0, r.output
    r = run_cli("eval", "model", str(ck), str(prepared), "--split", "train", "--no-reliance")
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert m["macro_f1_labels"] == "union of gold and predicted" and m["zero_division"] == 0
    assert m["ece_definition"].startswith("equal-width, 15 bins, top-label confidence") and 0 <= m["ece"] <= 1
    counts = [sum(col) for col in zip(*m["confusion_matrix"]["matrix"])]  # predictions per class
    used = [c for c, k in zip(m["per_class"].values(), counts) if c["support"] > 0 or k > 0]
    assert m["macro_f1_classes"] == len(used)
    assert m["macro_f1"] == pytest.approx(sum(c["f1"] for c in used) / len(used))


def test_eval_model_generation_reports_wer_cer(prepared, tiny_decoder, tmp_path):
    import jiwer

    out = tmp_path / "gen"
    r = run_cli("finetune", str(prepared), "--output", str(out), "--task", "generate", "--decoder", str(tiny_decoder),
                "--epochs", "1", "--batch-size", "8", "--hidden-size", "32", "--prefix-tokens", "2",
                "--max-new-tokens", "4")
    assert r.exit_code == 0, r.output
    r = run_cli("eval", "model", str(out), str(prepared), "--max-new-tokens", "4", "--no-reliance")
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert {"bleu", "wer", "cer", "wer_definition", "cer_definition", "bleu_signature"} <= set(m)
    assert m["wer"] >= 0 and m["cer"] >= 0 and "jiwer" in m["wer_definition"]
    assert m["n"] == len(m["examples"])  # the toy test split is small: every pair is shown, so check against jiwer
    refs, hyps = [e["target"] for e in m["examples"]], [e["generated"] for e in m["examples"]]
    assert m["wer"] == pytest.approx(jiwer.wer(refs, hyps)) and m["cer"] == pytest.approx(jiwer.cer(refs, hyps))
