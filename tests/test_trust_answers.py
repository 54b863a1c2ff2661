"""Issue 21, "no silent wrong answers" and "every failure is one line": the Python API's results belong to the
caller that asked, accuracy joins on ids, predict transcribes as prepare did, relative inputs work, a lone
surrogate is one record's problem, and broken files are one line naming them."""

from __future__ import annotations

import json
import threading

import pytest

from conftest import load_json_lines, run_cli


def test_threads_sharing_a_model_each_get_their_own_results(trained_checkpoint, capsys):
    """Three threads predicting on one loaded model (and a fourth running quiet) each get exactly their own
    ids, in their order; the quiet thread's setting does not silence the main thread."""
    import mmllm
    from mmllm import console

    model = mmllm.load(trained_checkpoint, device="cpu", quiet=True)
    texts = ["it is big", "it is small", "a big thing", "it is"]
    asked = {t: [{"id": f"t{t}-{i}", "text": texts[(i + t) % 4]} for i in range(23)] for t in range(4)}
    got: dict[int, list] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def work(t: int) -> None:
        try:
            start.wait()
            for _ in range(3):
                got[t] = model.predict(asked[t], batch_size=5)
                assert [r["id"] for r in got[t]] == [r["id"] for r in asked[t]]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors
    alone = {t: model.predict(asked[t]) for t in range(4)}
    for t in range(4):
        assert [r["id"] for r in got[t]] == [f"t{t}-{i}" for i in range(23)]
        assert all("error" not in r for r in got[t])
        assert [r["prediction"] for r in got[t]] == [r["prediction"] for r in alone[t]]
        assert [r["probability"] for r in got[t]] == pytest.approx([r["probability"] for r in alone[t]], abs=1e-6)
    # a thread's quiet / capture stays in that thread
    seen = []

    def quiet_thread() -> None:
        with console.capture(quiet=True) as docs:
            console.emit({"from": "thread"})
            seen.append((console.is_quiet(), docs))

    th = threading.Thread(target=quiet_thread)
    th.start()
    th.join()
    assert seen == [(True, [{"from": "thread"}])] and not console.is_quiet()
    capsys.readouterr()
    console.log("main thread still talks")
    console.emit({"from": "main"})
    out = capsys.readouterr()
    assert "main thread still talks" in out.err and json.loads(out.out) == {"from": "main"}


def test_predict_strict_and_the_api_share_one_loop(trained_checkpoint, tmp_path):
    """predict.stream is the one batch loop: the CLI writes what the API returns, an unreadable record in the middle
    keeps its place, and --strict stops at the first error after writing it."""
    import mmllm
    from mmllm.errors import UserError

    records = [{"id": "a", "text": "it is big"}, {"id": "b"}, {"id": "c", "text": "it is small"}]
    stdin = "\n".join(json.dumps(r) for r in records) + "\n"
    cli = run_cli("predict", trained_checkpoint, "-", "--batch-size", "1", input=stdin)
    assert cli.exit_code == 1
    model = mmllm.load(trained_checkpoint, device="cpu", quiet=True)
    assert model.predict(records, batch_size=1) == load_json_lines(cli.stdout)
    assert [r["id"] for r in load_json_lines(cli.stdout)] == ["a", "b", "c"]
    strict = run_cli("predict", trained_checkpoint, "-", "--strict", input=stdin)
    assert strict.exit_code == 2 and [r["id"] for r in load_json_lines(strict.stdout)] == ["a", "b"]
    with pytest.raises(UserError, match="record b: no input"):
        model.predict(records, strict=True)
