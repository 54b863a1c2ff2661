"""prepare says what it understood (issue 12.5): which column became which role, which were ignored, what it
looked for when no label/target column is found; splits are never empty when the records allow it."""

import json
import random
from collections import Counter

import pytest

from conftest import one_line_error, run_cli, write_image, write_wav

from mmllm.records import CANDIDATES, assign_splits, detect_columns


def manifest(tmp_path, rows, name="m.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def clip_kind_rows(tmp_path, n=8):
    """Images under 'picture' (a known name), audio under 'clip' and labels under 'kind' (unknown names)."""
    rows = []
    for i in range(n):
        write_image(tmp_path / f"i{i}.png", (200, 30, 30) if i % 2 else (30, 30, 200))
        write_wav(tmp_path / f"a{i}.wav", freq=300 + 60 * i)
        rows.append({"id": f"r{i}", "picture": f"i{i}.png", "clip": f"a{i}.wav", "kind": "odd" if i % 2 else "even"})
    return rows


def prepare(models, path, out, *extra):
    return run_cli("prepare", str(path), "--output", str(out), "--image-model", str(models["image"]),
                   "--audio-model", str(models["audio"]), "--val-fraction", "0.25", "--test-fraction", "0.25",
                   *extra)


def warnings(stderr):
    """The warnings on stderr, each unwrapped into one line (with whatever log text follows it)."""
    return ["warning:" + part for part in " ".join(stderr.split()).split("warning:")[1:]]


def test_unknown_columns_are_reported_and_stored(tiny_models, tmp_path):
    out = tmp_path / "p"
    r = prepare(tiny_models, manifest(tmp_path, clip_kind_rows(tmp_path)), out)
    assert r.exit_code == 0, r.output
    assert "columns: id <- id, image <- picture" in r.stderr
    found = warnings(r.stderr)
    assert any("columns not used: clip, kind" in w and "--audio-column" in w for w in found), r.stderr
    missing = next(w for w in found if "no label or target column" in w)
    for name in CANDIDATES["label"] + CANDIDATES["target"] + ["--label-column", "--target-column"]:
        assert name in missing
    meta = json.loads((out / "mmllm-prepared.json").read_text())
    assert meta["ignored_columns"] == ["clip", "kind"] and meta["modalities"] == ["image"]
    assert meta["columns"]["image"] == "picture" and meta["columns"]["audio"] is None and meta["labels"] == []


def test_flags_give_the_columns_their_roles(tiny_models, tmp_path):
    out = tmp_path / "p"
    path = manifest(tmp_path, clip_kind_rows(tmp_path))
    r = prepare(tiny_models, path, out, "--audio-column", "clip", "--label-column", "kind")
    assert r.exit_code == 0, r.output
    assert warnings(r.stderr) == []
    assert "audio <- clip" in r.stderr and "label <- kind" in r.stderr
    meta = json.loads((out / "mmllm-prepared.json").read_text())
    assert meta["ignored_columns"] == [] and meta["modalities"] == ["image", "audio"]
    assert meta["labels"] == ["even", "odd"] and meta["columns"]["label"] == "kind"


def test_empty_media_column_is_a_warning(tiny_models, tmp_path):
    rows = clip_kind_rows(tmp_path)
    for row in rows:
        row["audio"] = ""
        row["label"] = row.pop("kind")
    r = prepare(tiny_models, manifest(tmp_path, rows), tmp_path / "p")
    assert r.exit_code == 0, r.output
    assert any("column audio (audio) is empty in every record" in w for w in warnings(r.stderr)), r.stderr


def test_forty_records_over_eight_classes_fill_every_split(tiny_models, tmp_path):
    rows = []
    for i in range(40):
        write_image(tmp_path / f"i{i}.png", (6 * i, 255 - 6 * i, 100))
        rows.append({"id": i, "image": f"i{i}.png", "label": f"c{i % 8}"})
    r = run_cli("prepare", str(manifest(tmp_path, rows)), "--output", str(tmp_path / "p"), "--image-model",
                str(tiny_models["image"]))
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["counts"] == {"train": 32, "validation": 4, "test": 4}
    assert warnings(r.stderr) == []


def split_counts(sizes, val, test, seed=0):
    records = [{"id": f"{k}-{i}", "label": f"c{k}"} for k, n in enumerate(sizes) for i in range(n)]
    assign_splits(records, val, test, seed)
    per_class = Counter((r["label"], r["split"]) for r in records)
    return Counter(r["split"] for r in records), per_class, records


def test_splits_are_shared_over_all_records():
    totals, per_class, _ = split_counts([5] * 8, 0.1, 0.1)
    assert totals == {"train": 32, "validation": 4, "test": 4}
    for k in range(8):  # every class keeps training records, and gives at most one to validation/test
        assert per_class[(f"c{k}", "train")] >= 4
    # the held-out records come from different classes (each claim is 0.5 of a record)
    assert len({lab for (lab, split) in per_class if split != "train"}) == 8


@pytest.mark.parametrize("n, expected", [(1, {"train": 1}), (2, {"train": 1, "validation": 1}),
                                         (3, {"train": 1, "validation": 1, "test": 1}),
                                         (10, {"train": 8, "validation": 1, "test": 1})])
def test_small_sets_keep_one_record_for_training_first(n, expected):
    totals, _, _ = split_counts([n], 0.1, 0.1)
    assert dict(totals) == expected


def test_zero_fraction_means_no_split():
    totals, _, _ = split_counts([7, 5], 0.0, 0.0)
    assert dict(totals) == {"train": 12}
    totals, _, _ = split_counts([7, 5], 0.2, 0.0)
    assert dict(totals) == {"train": 10, "validation": 2}


def test_split_sizes_on_random_cases():
    rng = random.Random(0)
    for _ in range(200):
        sizes = [rng.randint(1, 30) for _ in range(rng.randint(1, 12))]
        val, test = rng.choice([0.1, 0.15, 0.2, 0.25]), rng.choice([0.0, 0.1, 0.2])
        n = sum(sizes)
        totals, per_class, records = split_counts(sizes, val, test, seed=rng.randint(0, 99))
        want_val = min(max(round(n * val), 1), n - 1)
        want_test = min(max(round(n * test), int(test > 0)), n - 1 - want_val)
        assert (totals["validation"], totals["test"]) == (want_val, want_test), (sizes, val, test)
        for k, size in enumerate(sizes):  # stratified: within one record of the class's exact share
            assert abs(per_class[(f"c{k}", "validation")] - size * val) < 1 + 1e-9 or size == 1
            if size > 1 and n - want_val - want_test >= len(sizes):
                assert per_class[(f"c{k}", "train")] >= 1
        # same seed, same assignment
        again = split_counts(sizes, val, test, seed=0)[2]
        first = split_counts(sizes, val, test, seed=0)[2]
        assert [r["split"] for r in again] == [r["split"] for r in first]


def test_given_splits_are_kept():
    records = [{"id": i, "label": "a", "split": "test" if i < 3 else None} for i in range(10)]
    assign_splits(records, 0.1, 0.1, 0)
    assert Counter(r["split"] for r in records) == {"test": 3 + 1, "validation": 1, "train": 5}


def test_single_class_and_missing_validation_are_warnings(tiny_models, tmp_path):
    rows = []
    for i in range(6):
        write_image(tmp_path / f"i{i}.png", (40 * i, 0, 0))
        rows.append({"id": i, "image": f"i{i}.png", "label": "only"})
    r = run_cli("prepare", str(manifest(tmp_path, rows)), "--output", str(tmp_path / "p"), "--image-model",
                str(tiny_models["image"]), "--val-fraction", "0", "--test-fraction", "0")
    assert r.exit_code == 0, r.output
    found = warnings(r.stderr)
    assert any("label 'only'" in w and "one class" in w for w in found), r.stderr
    assert any("no validation records" in w for w in found), r.stderr


def test_no_train_split_is_written_with_a_warning_and_finetune_says_so(tiny_models, tmp_path):
    """Every record split=test: prepare writes it (eval can use it) and warns; finetune refuses in one line."""
    rows = [{"id": i, "text": ["it is big", "it is small"][i % 2], "label": "bs"[i % 2], "split": "test"}
            for i in range(4)]
    r = run_cli("prepare", str(manifest(tmp_path, rows)), "--output", str(tmp_path / "p"), "--text-model",
                str(tiny_models["text"]))
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["counts"] == {"test": 4} and (tmp_path / "p" / "test").is_dir()
    assert any(w.startswith("warning: no train records ({'test': 4}): finetune needs train") for w in
               warnings(r.stderr)), r.stderr
    line = one_line_error(run_cli("finetune", str(tmp_path / "p"), "--output", str(tmp_path / "ck")))
    assert f"{tmp_path / 'p'} has no train and no validation split (it has: test)" in line, line
    assert not (tmp_path / "ck").exists()


def test_hand_edited_labels_of_prepared_data_are_refused(tiny_models, tmp_path):
    """The dataset's label ids are named in each split's dataset_info.json; the `labels` of mmllm-prepared.json are
    a copy finetune reads. Editing one alone would silently unlabel records: one line instead, naming both."""
    rows = [{"id": i, "text": ["it is big", "it is small"][i % 2], "label": "bs"[i % 2]} for i in range(8)]
    r = run_cli("prepare", str(manifest(tmp_path, rows)), "--output", str(tmp_path / "p"), "--text-model",
                str(tiny_models["text"]), "--test-fraction", "0")
    assert r.exit_code == 0, r.output
    path = tmp_path / "p" / "mmllm-prepared.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps(dict(meta, labels=["big", "s"])))
    line = one_line_error(run_cli("finetune", str(tmp_path / "p"), "--output", str(tmp_path / "ck")))
    assert line.startswith(f"error: {path} and {tmp_path / 'p' / 'train' / 'dataset_info.json'} disagree on the "
                           "labels (id 0: 'big' vs 'b')"), line
    assert not (tmp_path / "ck").exists()


def test_detect_columns_lists_ignored_in_input_order():
    cols = detect_columns(["notes", "Text", "clip", "label"], {})
    assert cols["text"] == "Text" and cols["label"] == "label" and cols.ignored == ["notes", "clip"]
    assert json.loads(json.dumps(cols)) == dict(cols)  # still a plain mapping on disk
