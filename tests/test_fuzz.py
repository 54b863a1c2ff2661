"""Fuzzing manifest parsing and predict's JSONL input: never a crash, always a message or a result."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmllm.errors import UserError
from mmllm.records import RecordError, read_records

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
                           lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids,
                                                                                     max_size=3), max_leaves=8)
record = st.dictionaries(st.sampled_from(["id", "text", "image", "audio", "label", "split", "target", "x"]),
                         json_values, max_size=6)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(st.binary(max_size=400), st.sampled_from([".csv", ".jsonl", ".tsv", ".parquet"]))
def test_random_bytes_as_manifest(tmp_path, data, suffix):
    path = tmp_path / f"m{suffix}"
    path.write_bytes(data)
    try:
        records, errors, cols = read_records(str(path), {})
    except UserError as e:
        assert str(e) and "\n" not in str(e)
        return
    for e in errors:
        assert e["reason"]
    assert all("id" in r for r in records)


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
@given(st.lists(st.one_of(record.map(json.dumps), st.text(max_size=30)), min_size=1, max_size=6))
def test_predict_stdin_never_crashes(trained_checkpoint, lines):
    from conftest import run_cli

    text = "\n".join(line.replace("\n", " ") for line in lines) + "\n"
    r = run_cli("predict", str(trained_checkpoint), "-", input=text)
    assert r.exit_code in (0, 1), r.output
    assert "Traceback" not in r.output
    out = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(out) == sum(1 for line in lines if line.replace("\n", " ").strip())
    assert all(("prediction" in o) != ("error" in o) for o in out)
    assert (r.exit_code == 1) == any("error" in o for o in out)


def test_record_error_carries_column():
    e = RecordError("text", "expected text")
    assert e.column == "text" and e.reason == "expected text"
