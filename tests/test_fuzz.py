"""Fuzzing manifest parsing and predict's JSONL input: never a crash, always a message or a result."""

import io
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmllm import modalities
from mmllm.errors import UserError
from mmllm.records import RecordError, format_error, read_records

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
                           lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids,
                                                                                     max_size=3), max_leaves=8)
record = st.dictionaries(st.sampled_from(["id", "text", "image", "audio", "label", "split", "target", "x"]),
                         json_values, max_size=6)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _nested(depth: int, opener: str, closed: bool) -> str:
    closer = {"[": "]", '{"a":': "}", '{"text":[': "]}"}[opener]
    return opener * depth + ("1" + closer * depth if closed else "")


nested_line = st.builds(_nested, st.integers(1, 150_000), st.sampled_from(["[", '{"a":', '{"text":[']),
                        st.booleans())


@SETTINGS
@given(st.binary(max_size=400), st.sampled_from([".csv", ".jsonl", ".tsv", ".parquet"]))
def test_random_bytes_as_manifest(tmp_path, data, suffix):
    path = tmp_path / f"m{suffix}"
    path.write_bytes(data)
    lines = data.removeprefix(b"\xef\xbb\xbf").split(b"\n")
    nonblank = [i for i, line in enumerate(lines, start=1) if line.strip(b" \t\r")]
    try:
        records, errors, cols = read_records(str(path), {})
    except UserError as e:
        assert str(e) and "\n" not in str(e)
        # a JSONL file fails as a whole only when it has no lines, or no line names a text/image/audio key
        assert suffix != ".jsonl" or not nonblank or f"no {modalities.spelled()} column" in str(e)
        return
    for e in errors:
        assert e["reason"] and "\n" not in e["reason"]
    rows = [r["row"] for r in records]
    assert rows == sorted(set(rows)) and not set(rows) & {e["row"] for e in errors}  # file order, each row once
    assert all(isinstance(r["id"], str) and r["id"] for r in records)
    if suffix == ".jsonl":  # every non-blank line is a record or an error, at its own line number
        assert sorted(rows + [e["row"] for e in errors]) == nonblank


@SETTINGS
@given(st.lists(record, max_size=8))
def test_random_jsonl_structures(tmp_path, rows):
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    try:
        records, errors, _ = read_records(str(path), {})
    except UserError as e:
        assert str(e)
        return
    assert len(records) + len(errors) == len(rows)
    for r in records:
        assert r["text"] is None or isinstance(r["text"], str)
        assert r["label"] is None or isinstance(r["label"], str)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(record.map(json.dumps), st.text(max_size=30), nested_line), min_size=1, max_size=6))
def test_predict_stdin_never_crashes(trained_checkpoint, lines):
    from conftest import run_cli

    lines = [line.replace("\n", " ") for line in lines]
    r = run_cli("predict", str(trained_checkpoint), "-", input="\n".join(lines) + "\n")
    assert r.exit_code in (0, 1), r.output
    assert "Traceback" not in r.output
    out = [json.loads(x) for x in r.stdout.split("\n") if x]  # not splitlines: U+2028 in an id is not a break
    kept = [line for line in lines if line.strip(" \t\r")]
    assert len(out) == len(kept)  # one line out per line in, in order
    assert all(("prediction" in o) != ("error" in o) for o in out)
    assert (r.exit_code == 1) == any("error" in o for o in out)
    for o, line in zip(out, kept):
        try:
            given = json.loads(line)
        except Exception:  # noqa: BLE001 - malformed or too deep: its error line has a row id
            given = None
        if isinstance(given, dict) and isinstance(given.get("id"), (str, int)) and given["id"] != "":
            assert o["id"] == given["id"]  # echoed exactly as given
        text = given.get("text") if isinstance(given, dict) else None
        if isinstance(given, dict) and (text is None or text != text or isinstance(text, str) and not text.strip()):
            assert "error" in o  # a text-only checkpoint never answers without text (None, NaN, blank)


def test_record_error_names_the_manifests_own_column(tmp_path):
    rows = [{"key": "a", "body": {"nested": 1}}, {"key": "b", "body": "fine"}, {"key": ["x"], "body": "ok"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    records, errors, _ = read_records(str(tmp_path / "m.jsonl"), {"text": "body", "id": "key"})
    assert [r["id"] for r in records] == ["b"]
    assert [(e["id"], e["row"], e["column"]) for e in errors] == [("a", 1, "body"), ("row3", 3, "key")]
    assert format_error(errors[0]) == "record a, row 1, column body: expected text, got a JSON dict"
    assert format_error(errors[1]) == "record row3, row 3, column key: expected a scalar, got a JSON list"


@SETTINGS
@given(st.lists(nested_line, min_size=1, max_size=4))
def test_nesting_of_any_depth_is_one_lines_problem(tmp_path, nests):
    lines = []
    for i, bad in enumerate(nests):
        lines += [json.dumps({"id": f"g{i}", "text": "ok"}), bad]
    lines.append(json.dumps({"id": "last", "text": "ok"}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    records, errors, _ = read_records(str(tmp_path / "m.jsonl"), {})
    by_row = {r["row"]: r for r in records}
    assert len(by_row) + len(errors) == len(lines) and not set(by_row) & {e["row"] for e in errors}
    for row, line in enumerate(lines, start=1):
        if line.startswith('{"id"'):  # the good lines around each nested one are read intact
            assert by_row[row]["id"] == json.loads(line)["id"] and by_row[row]["text"] == "ok"
    for e in errors:
        assert e["reason"] and "\n" not in e["reason"]
        assert e["reason"] == "JSON nested too deeply to read" or e["reason"].startswith(("malformed JSON",
                                                                                          "expected a JSON object",
                                                                                          "expected text"))


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 5000), st.sampled_from(["x", "\u00e9", "\u2028"])), min_size=1, max_size=6),
       st.integers(1, 6000), st.booleans(), st.integers(1, 64))
def test_line_limit_is_exact_and_memory_bounded(sizes, limit, trailing_newline, buffer_size):
    from mmllm.records import MB, json_lines

    objs = [{"id": f"r{i}", "text": char * n} for i, (n, char) in enumerate(sizes)]
    raw = [json.dumps(o, ensure_ascii=False).encode() for o in objs]
    data = b"\n".join(raw) + (b"\n" if trailing_newline else b"")
    stream = io.BufferedReader(io.BytesIO(data), buffer_size=buffer_size)
    out = list(json_lines(stream, limit / MB))
    assert [row for row, _ in out] == list(range(1, len(objs) + 1))
    for (_, got), line, obj in zip(out, raw, objs):
        if len(line) > limit:
            assert isinstance(got, RecordError) and got.reason.startswith("line longer than")
        else:
            assert got == obj  # U+2028 inside a string is not a line break
