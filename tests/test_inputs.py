"""Untrusted input: special files and giant inputs never hang, one bad line never kills a run, and no answer
is given without input (issue 12, points 2-4). Commands that could hang run as subprocesses under a timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import one_line_error, run_cli, write_image
from mmllm.records import RecordError, checked_record, read_records

TIMEOUT = 300  # generous for a loaded 2-core machine; a hang is what it catches, not slowness
WORDS = ["it is big", "it is small"]


def cli(*args, input: bytes | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The real CLI in a child process, killed (and the test failed) if it does not finish in TIMEOUT s."""
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="400")  # rich wraps stderr at 80 columns off a terminal
    return subprocess.run([sys.executable, "-m", "mmllm", *map(str, args)], input=input, capture_output=True,
                          timeout=TIMEOUT, env=env, cwd=cwd)


def lines_of(text: str | bytes) -> list[dict]:
    text = text.decode() if isinstance(text, bytes) else text
    return [json.loads(x) for x in text.splitlines() if x.strip()]


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def train(root: Path, models: dict, rows: list[dict], *flags: str) -> Path:
    """A tiny checkpoint trained one epoch on `rows` (prepared without the feature cache)."""
    root.mkdir(parents=True, exist_ok=True)
    r = run_cli("prepare", jsonl(root / "m.jsonl", rows), "--output", root / "p", "--text-model", models["text"],
                "--image-model", models["image"], "--max-text-tokens", "32", "--no-cache", "--test-fraction", "0",
                "--val-fraction", "0.25", *flags)
    assert r.exit_code == 0, r.output
    r = run_cli("finetune", root / "p", "--output", root / "ck", "--epochs", "1", "--hidden-size", "16")
    assert r.exit_code == 0, r.output
    return root / "ck"


@pytest.fixture(scope="module")
def text_ckpt(tiny_models, tmp_path_factory) -> Path:
    rows = [{"id": f"t{i}", "text": WORDS[i % 2], "label": "bs"[i % 2]} for i in range(16)]
    return train(tmp_path_factory.mktemp("text"), tiny_models, rows)


@pytest.fixture(scope="module")
def image_ckpt(tiny_models, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("image")
    rows = []
    for i in range(12):
        write_image(root / f"g{i}.png", (200, 30, 30) if i % 2 else (30, 30, 200))
        rows.append({"id": f"g{i}", "text": WORDS[i % 2], "image": f"g{i}.png", "label": "ab"[i % 2]})
    return train(root, tiny_models, rows)


@pytest.fixture
def special_files(tmp_path) -> dict[str, str]:
    """A named pipe, /dev/zero, a symlink to /dev/zero, and a 2 MB file (over --max-file-mb 1)."""
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    (tmp_path / "huge.png").write_bytes(b"\0" * (2 << 20))
    return {"fifo": str(tmp_path / "pipe.png"), "devzero": "/dev/zero", "zerolink": str(tmp_path / "zero.png"),
            "huge": str(tmp_path / "huge.png")}


REASONS = {"fifo": "not a regular file (a named pipe)", "devzero": "not a regular file (a character device)",
           "zerolink": "not a regular file (a character device)", "huge": "file too large (2.0 MB > --max-file-mb 1)"}


# ---------------------------------------------------------------- 12.2 special files and giant inputs

def test_prepare_skips_pipes_devices_and_files_over_the_limit(tiny_models, tmp_path, special_files):
    rows = []
    for i in range(6):
        write_image(tmp_path / f"g{i}.png", (200, 30, 30) if i % 2 else (30, 30, 200))
        rows.append({"id": f"good{i}", "text": WORDS[i % 2], "image": f"g{i}.png", "label": "ab"[i % 2]})
    rows += [{"id": name, "text": "it is big", "image": path, "label": "a"} for name, path in special_files.items()]
    r = cli("prepare", jsonl(tmp_path / "m.jsonl", rows), "--output", tmp_path / "out", "--text-model",
            tiny_models["text"], "--image-model", tiny_models["image"], "--max-text-tokens", "32",
            "--max-file-mb", "1", "--val-fraction", "0", "--test-fraction", "0")
    assert r.returncode == 0, r.stderr.decode()
    summary = json.loads(r.stdout)
    assert summary["counts"] == {"train": 6} and summary["skipped"] == 4
    meta = json.loads((tmp_path / "out" / "mmllm-prepared.json").read_text())
    skipped = {e["id"]: e for e in meta["skipped"]}
    assert set(skipped) == set(REASONS)
    stderr = r.stderr.decode()
    for name, reason in REASONS.items():
        assert skipped[name]["column"] == "image" and skipped[name]["reason"].startswith(reason)
        line = [x for x in stderr.splitlines() if f"record {name}," in x]
        assert len(line) == 1 and "column image" in line[0] and reason in line[0]


def test_predict_error_lines_for_special_files_and_long_lines(image_ckpt, tmp_path, special_files):
    write_image(tmp_path / "ok.png")
    good = {"id": "a", "text": "it is big", "image": str(tmp_path / "ok.png")}
    bad = [{"id": name, "text": "it is big", "image": path} for name, path in special_files.items()]
    long_line = json.dumps({"id": "long", "text": "big " * (600 << 10)})  # 2.4 MB
    stdin = "\n".join([json.dumps(good), *map(json.dumps, bad), long_line, json.dumps(dict(good, id="b"))]) + "\n"
    r = cli("predict", image_ckpt, "-", "--max-file-mb", "1", "--max-line-mb", "1", input=stdin.encode())
    assert r.returncode == 1, r.stderr.decode()
    out = lines_of(r.stdout)
    assert [o["id"] for o in out] == ["a", *special_files, "row6", "b"]
    assert "prediction" in out[0] and "prediction" in out[-1] and out[0]["probability"] == out[-1]["probability"]
    for o, name in zip(out[1:5], special_files):
        assert set(o) == {"id", "error"} and o["error"].startswith(f"column image: {REASONS[name]}")
    assert out[5]["error"] == "line longer than 1 MB (--max-line-mb): not parsed"


def test_media_readers_refuse_special_files_without_opening_them(tmp_path):
    """Every reader of a media path (hash, image, audio) refuses a pipe with no writer: opening it would block."""
    os.mkfifo(tmp_path / "p.wav")
    code = textwrap.dedent(f"""
        from mmllm.features import content_hash
        from mmllm.media import MediaError, load_audio, load_image
        for f in (content_hash, load_image, lambda p: load_audio(p, 16000)):
            for path in ({str(tmp_path / 'p.wav')!r}, "/dev/zero"):
                try:
                    f(path)
                except MediaError as e:
                    print(e)
        """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"not a regular file (a named pipe): {tmp_path / 'p.wav'}",
                                     "not a regular file (a character device): /dev/zero"] * 3


MEASURE = """
import resource, subprocess, sys
child = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
sys.stdout.write(child.stdout.decode())
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, child.returncode)
"""


def _peak_predict(ckpt: Path, stdin: bytes) -> tuple[int, int, list[dict]]:
    """(peak RSS in kB, exit code, output lines) of `mmllm predict CKPT -` in a fresh process."""
    argv = [sys.executable, "-c", MEASURE, sys.executable, "-m", "mmllm", "predict", str(ckpt), "-"]
    r = subprocess.run(argv, input=stdin, capture_output=True, timeout=TIMEOUT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    *out, last = r.stdout.decode().splitlines()
    rss, code = map(int, last.split())
    return rss, code, lines_of("\n".join(out))


def test_predict_memory_on_a_120_mb_line_stays_near_a_normal_run(text_ckpt):
    good = [json.dumps({"id": "a", "text": "it is big"}).encode(), json.dumps({"id": "b", "text": "small"}).encode()]
    normal_rss, code, out = _peak_predict(text_ckpt, b"\n".join(good) + b"\n")
    assert code == 0 and [o["id"] for o in out] == ["a", "b"]
    huge = b'{"id": "huge", "text": "' + b"big " * (30 << 20) + b'"}'  # 120 MB on one line
    big_rss, code, out = _peak_predict(text_ckpt, b"\n".join([good[0], huge, good[1]]) + b"\n")
    assert code == 1 and [o["id"] for o in out] == ["a", "row2", "b"]
    assert out[1]["error"] == "line longer than 16 MB (--max-line-mb): not parsed" and "prediction" in out[2]
    assert big_rss <= 1.2 * normal_rss, (big_rss, normal_rss)


def test_predict_memory_on_a_12_mb_text_under_the_line_limit(text_ckpt):
    """A text just under --max-line-mb is predicted, and only its head is tokenized (was 2.5 GB vs 0.42 GB)."""
    good = json.dumps({"id": "a", "text": "it is big"}).encode()
    normal_rss, code, _ = _peak_predict(text_ckpt, good + b"\n")
    assert code == 0
    big = b'{"id": "big", "text": "' + b"big " * (3 << 20) + b'"}'  # 12 MB of text on one line
    big_rss, code, out = _peak_predict(text_ckpt, big + b"\n" + good + b"\n")
    assert code == 0 and [o["id"] for o in out] == ["big", "a"] and "prediction" in out[0]
    assert big_rss <= normal_rss + 400 * 1024, (big_rss, normal_rss)  # kB: the line and its decoded copies

# ---------------------------------------------------------------- 12.3 one bad line never kills a run

DEEP_ARRAY = "[" * 100_000 + "]" * 100_000
DEEP_FIELD = '{"id": "deep2", "text": ' + '{"a": ' * 100_000 + "1" + "}" * 100_001


def test_predict_deeply_nested_lines_are_errors_and_the_rest_is_printed_in_order(text_ckpt):
    lines = [json.dumps({"id": "a", "text": "it is big"}), DEEP_ARRAY, DEEP_FIELD, "{" * 100_000,
             json.dumps({"id": "b", "text": "it is small"})]
    r = run_cli("predict", text_ckpt, "-", input="\n".join(lines) + "\n")
    assert r.exit_code == 1 and "Traceback" not in r.output
    out = lines_of(r.stdout)
    assert [o["id"] for o in out] == ["a", "row2", "row3", "row4", "b"]
    assert "prediction" in out[0] and "prediction" in out[4]
    assert [o["error"] for o in out[1:3]] == ["JSON nested too deeply to read"] * 2
    assert out[3]["error"].startswith("malformed JSON") or out[3]["error"] == "JSON nested too deeply to read"


def test_prepare_keeps_the_good_records_of_a_jsonl_with_a_deep_line(tiny_models, tmp_path):
    rows = [{"id": f"r{i}", "text": WORDS[i % 2], "label": "bs"[i % 2]} for i in range(60)]
    path = jsonl(tmp_path / "m.jsonl", rows[:30] + [DEEP_ARRAY, DEEP_FIELD] + rows[30:])
    r = run_cli("prepare", path, "--output", tmp_path / "out", "--text-model", tiny_models["text"],
                "--max-text-tokens", "32")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert sum(summary["counts"].values()) == 60 and summary["skipped"] == 2
    meta = json.loads((tmp_path / "out" / "mmllm-prepared.json").read_text())
    assert [(e["row"], e["reason"]) for e in meta["skipped"]] == [(31, "JSON nested too deeply to read"),
                                                                   (32, "JSON nested too deeply to read")]


def test_any_failure_inside_one_record_is_that_records_error(tmp_path):
    nested: dict = {"path": "x.png"}
    for _ in range(100_000):  # deeper than any recursion limit: reading it recursively must fail
        nested = {"path": nested}
    cols = {"id": "id", "text": "text", "image": "image", "audio": None, "label": None, "target": None, "split": None}
    with pytest.raises(RecordError) as e:
        checked_record({"id": "n", "text": "hi", "image": nested}, 3, cols, tmp_path)
    assert "RecursionError" in e.value.reason
    # a CSV row that the csv module rejects (a field over its size limit) does not end the file
    (tmp_path / "m.csv").write_text("id,text\na,one\nb," + "x" * 200_000 + "\nc,three\n")
    records, errors, _ = read_records(str(tmp_path / "m.csv"), {})
    assert [r["id"] for r in records] == ["a", "c"] and [e["row"] for e in errors] == [3]
    assert "field larger than field limit" in errors[0]["reason"]


# ---------------------------------------------------------------- 12.4 no answer without input

def test_predict_refuses_records_without_input_and_echoes_ids(text_ckpt):
    lines = [{"id": "q2"}, {"id": "m", "txt": "it is big", "img": "x.png"}, {"id": "m2", "txt": "it is small"},
             {"id": "n", "text": None, "image": None}, {"id": "w", "text": " \t "},
             {"id": "d", "text": "it is big"}, {"id": "d", "text": "it is small"}, {"id": 7, "text": "it is big"},
             {"id": " sp ", "text": "it is big"}, {"text": "it is small"}]
    r = run_cli("predict", text_ckpt, "-", input="\n".join(map(json.dumps, lines)) + "\n")
    assert r.exit_code == 1, r.output
    out = lines_of(r.stdout)
    assert [o["id"] for o in out] == ["q2", "m", "m2", "n", "w", "d", "d", 7, " sp ", "row10"]
    for o in out[:5]:
        assert set(o) == {"id", "error"} and o["error"].startswith('no input: expected "text" (got keys: id')
    assert all("prediction" in o for o in out[5:])
    warnings = " ".join(r.stderr.split())  # unwrapped
    assert warnings.count("'txt'") == 1 and "ignoring unknown key(s) 'txt': this checkpoint reads \"text\"" in warnings
    assert warnings.count("'img'") == 1 and "inputs this checkpoint does not use 'img'" in warnings  # img: an image
    # duplicate ids are predicted each on its own record: the same as with distinct ids
    distinct = run_cli("predict", text_ckpt, "-", input="\n".join(json.dumps({"id": f"d{i}", "text": t})
                                                                 for i, t in enumerate(WORDS)) + "\n")
    assert [o["probability"] for o in out[5:7]] == [o["probability"] for o in lines_of(distinct.stdout)]


def test_checkpoint_on_custom_columns_reads_its_names_and_the_usual_ones(tiny_models, tmp_path):
    rows = [{"uid": f"u{i}", "body": WORDS[i % 2], "kind": "bs"[i % 2]} for i in range(12)]
    ck = train(tmp_path / "custom", tiny_models, rows, "--id-column", "uid", "--text-column", "body",
               "--label-column", "kind")
    lines = [{"uid": "a", "body": "it is big"}, {"id": "b", "text": "it is big"}, {"id": "c", "txt": "it is big"}]
    r = run_cli("predict", ck, "-", input="\n".join(map(json.dumps, lines)) + "\n")
    out = lines_of(r.stdout)
    assert r.exit_code == 1 and [o["id"] for o in out] == ["a", "b", "c"]
    assert out[0]["probability"] == out[1]["probability"] and out[0]["prediction"] == out[1]["prediction"]
    assert out[2]["error"].startswith('no input: expected "body" or "text"')


def test_eval_on_a_raw_manifest_honours_split(text_ckpt, tmp_path):
    splits = ["train"] * 6 + ["validation", "val", "dev", "validation"] + ["test"] * 2
    rows = [{"id": f"e{i}", "text": WORDS[i % 2], "label": "bs"[i % 2], "split": s} for i, s in enumerate(splits)]
    path = jsonl(tmp_path / "m.jsonl", rows)
    for split, n in (("validation", 4), ("test", 2), ("train", 6)):
        r = run_cli("eval", "model", text_ckpt, path, "--split", split, "--no-reliance")
        assert r.exit_code == 0, r.output
        result = json.loads(r.stdout)
        assert (result["split"], result["n"]) == (split, n)
    r = run_cli("eval", "model", text_ckpt, path, "--split", "holdout", "--no-reliance")
    assert r.exit_code == 2 and "--split: " in r.stderr and "no split 'holdout' (has: test, train, validation)" \
        in r.stderr.replace("\n", "")
    unsplit = jsonl(tmp_path / "u.jsonl", [{k: v for k, v in row.items() if k != "split"} for row in rows])
    r = run_cli("eval", "model", text_ckpt, unsplit, "--split", "validation", "--no-reliance")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert (result["split"], result["n"]) == ("all", 12) and "no split column" in r.stderr


def test_csv_line_endings_lf_crlf_and_lone_cr_read_the_same(tmp_path):
    from mmllm.records import read_table

    rows = ["id,text,label", "a,it is big,b", 'b,"two\nlines",s']
    seen = []
    for end in ("\n", "\r\n", "\r"):
        path = tmp_path / f"m{len(seen)}.csv"
        path.write_bytes(end.join(rows).encode() + end.encode())
        columns, it = read_table(path)
        seen.append((columns, [(i, r["id"], r["label"]) for i, r in it]))
    assert seen[0] == seen[1] == seen[2] == (["id", "text", "label"], [(2, "a", "b"), (3, "b", "s")])


def test_csv_with_a_column_named_twice_is_one_line_naming_it(tmp_path):
    """Two `text` columns (here one with a space before it) would leave one silently unread: refused instead."""
    (tmp_path / "m.csv").write_text("id,text,label, text\na,it is big,b,it is small\n")
    line = one_line_error(run_cli("prepare", str(tmp_path / "m.csv"), "--output", str(tmp_path / "o")))
    assert f"{tmp_path / 'm.csv'}: column 'text' appears twice in the header (columns 2 and 4)" in line
    assert not (tmp_path / "o").exists()
    from mmllm.records import read_table

    (tmp_path / "trailing.csv").write_text("id,text,label,,\na,it is big,b,,\n")  # unnamed columns: no role, allowed
    columns, rows = read_table(tmp_path / "trailing.csv")
    assert columns == ["id", "text", "label", "", ""] and next(rows)[1]["text"] == "it is big"


def test_non_finite_ids_are_that_records_error(tmp_path):
    """NaN/inf ids (a Parquet float column, JSONL NaN/Infinity) are each that record's error in column id, never
    silently `rowN` (prepare) or 'inf' (an id that two records could share)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmllm.records import convert_rows, format_error, json_lines

    pq.write_table(pa.table({"id": [1.5, float("nan"), -float("inf")], "text": [*WORDS, "a"]}), tmp_path / "m.parquet")
    lines = ['{"id": 1.5, "text": "it is big"}', '{"id": NaN, "text": "it is small"}', '{"id": -Infinity, "text": "a"}']
    jsonl(tmp_path / "m.jsonl", lines)
    for name in ("m.parquet", "m.jsonl"):
        records, errors, _ = read_records(str(tmp_path / name), {})
        assert [r["id"] for r in records] == ["1.5"]
        assert [(e["row"], e["column"]) for e in errors] == [(2, "id"), (3, "id")]
        assert format_error(errors[0]) == "record row2, row 2, column id: id is NaN, not a usable id: give a finite " \
                                          "number or a text"
        assert "id is -inf" in errors[1]["reason"]
    # predict / serve / the API read records with the same code: the record's error line, in order
    with open(tmp_path / "m.jsonl", "rb") as f:
        out = list(convert_rows(json_lines(f), {"model": {"modalities": ["text"]}}, tmp_path))
    assert out[0]["given_id"] == 1.5
    assert [(stub["id"], e.column) for stub, e in out[1:]] == [("row2", "id"), ("row3", "id")]
