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


def test_accuracy_normalizes_line_endings(tmp_path):
    """A gold file written on Windows (CRLF, or old-Mac CR) scores like its LF twin; BLEU reads it alike."""
    (tmp_path / "pred.txt").write_text("a\nb\nb\n")
    for name, ending in (("crlf", "\r\n"), ("cr", "\r"), ("lf", "\n")):
        (tmp_path / f"{name}.txt").write_bytes(ending.join(["a", "b", "a"]).encode() + ending.encode())
        r = run_cli("eval", "accuracy", "--pred", tmp_path / "pred.txt", "--gold", tmp_path / f"{name}.txt")
        assert r.exit_code == 0, r.output
        out = json.loads(r.stdout)
        assert (out["n"], out["accuracy"], out["confusion_matrix"]["labels"]) == (3, 2 / 3, ["a", "b"]), name
    (tmp_path / "hyp.txt").write_bytes(b"it is a big red thing\r\nit is a small blue thing\r\n")
    (tmp_path / "ref.txt").write_text("it is a big red thing\nit is a small blue thing\n")
    r = run_cli("eval", "bleu", "--hyp", tmp_path / "hyp.txt", "--ref", tmp_path / "ref.txt")
    assert r.exit_code == 0 and json.loads(r.stdout.splitlines()[-1])["bleu"] == pytest.approx(100.0)


def test_accuracy_joins_on_ids_in_any_order(tmp_path):
    """Predictions and gold that both carry ids are matched by id, not by line; the join is reported."""
    gold = {f"r{i}": "abc"[i % 3] for i in range(9)}
    preds = [{"id": i, "prediction": gold[i] if i != "r4" else "c"} for i in reversed(list(gold))]
    (tmp_path / "pred.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    (tmp_path / "gold.csv").write_text("id,label\n" + "".join(f"{i},{g}\n" for i, g in gold.items()))
    (tmp_path / "gold.jsonl").write_text("".join(json.dumps({"id": i, "label": g}) + "\n" for i, g in gold.items()))
    for g in ("gold.csv", "gold.jsonl"):
        r = run_cli("eval", "accuracy", "--pred", tmp_path / "pred.jsonl", "--gold", tmp_path / g)
        assert r.exit_code == 0, r.output
        out = json.loads(r.stdout)
        assert out["accuracy"] == pytest.approx(8 / 9) and out["n"] == 9
        assert (out["joined_on"], out["matched"], out["missing_predictions"], out["unmatched_predictions"]) == \
            ("id", 9, 0, 0)
    # two predictions missing, one extra: scored over the 7 matched, said on stderr and in the result
    (tmp_path / "part.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds[2:] + [{"id": "zz",
                                                                                             "prediction": "a"}]))
    r = run_cli("eval", "accuracy", "--pred", tmp_path / "part.jsonl", "--gold", tmp_path / "gold.csv")
    out = json.loads(r.stdout)
    assert r.exit_code == 0 and (out["n"], out["matched"], out["missing_predictions"],
                                 out["unmatched_predictions"]) == (7, 7, 2, 1)
    assert "matched 7 records by id; 2 gold record(s) have no prediction" in r.stderr
    (tmp_path / "twice.jsonl").write_text('{"id": "r1", "prediction": "a"}\n{"id": "r1", "prediction": "b"}\n')
    r = run_cli("eval", "accuracy", "--pred", tmp_path / "twice.jsonl", "--gold", tmp_path / "gold.csv")
    assert r.exit_code == 2 and "id 'r1' appears twice" in r.stderr


def test_predict_and_eval_transcribe_like_prepare_for_every_task(tiny_models, tmp_path):
    """For each task x modalities that reads transcripts (a classifier's text model; a generator's prompt, with or
    without an audio prefix): the predictor transcribes raw records as prepare did, and predict, eval on the raw
    manifest and eval on the prepared folder give the same outputs for the same records."""
    import numpy as np

    from conftest import make_tokenizer, write_csv, write_wav
    from mmllm.features import featurize, load_prepared
    from mmllm.metrics import expected_calibration_error
    from mmllm.predict import Predictor
    from mmllm.records import raw_records
    import shutil

    whisper = tmp_path / "whisper"
    shutil.copytree(tiny_models["whisper"], whisper)
    make_tokenizer().save_pretrained(whisper)
    from transformers import GPT2Config, GPT2LMHeadModel
    import torch

    torch.manual_seed(0)
    tok = make_tokenizer()
    tok.eos_token = "[SEP]"
    decoder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=256,
                               eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)).save_pretrained(decoder)
    tok.save_pretrained(decoder)
    rows = []
    for i in range(16):
        audio = write_wav(tmp_path / f"a{i}.wav", freq=300 + 150 * (i % 4), seconds=0.5 + 0.1 * (i % 3))
        rows.append({"id": f"r{i}", "text": "" if i % 5 == 1 else ["it is big", "it is small"][i % 2],
                     "audio": audio.name, "label": ["b", "s"][i % 2], "target": ["a big thing", "a small thing"][i % 2],
                     "split": ["train", "train", "validation", "test"][i % 4]})
    manifest = write_csv(tmp_path / "m.csv", rows)
    r = run_cli("prepare", manifest, "--output", tmp_path / "p", "--text-model", tiny_models["text"], "--audio-model",
                tiny_models["whisper"], "--transcribe", "--transcribe-model", whisper, "--batch-size", "4")
    assert r.exit_code == 0, r.output
    ds, _ = load_prepared(tmp_path / "p")
    prepared = {row["id"]: row for split in ds for row in ds[split].to_list()}
    test_ids = [f"r{i}" for i in range(3, 16, 4)]
    assert all(prepared[i]["transcript"] for i in test_ids)
    combos = [("classify", "text"), ("classify", "text,audio"), ("generate", "audio"), ("generate", "text")]
    for task, mods in combos:
        ck = tmp_path / f"ck-{task}-{mods}"
        extra = ["--task", "generate", "--decoder", decoder, "--prefix-tokens", "2", "--max-new-tokens", "6"] \
            if task == "generate" else []
        extra += ["--lora-r", "2"] if (task, mods) == ("generate", "text") else []  # else nothing to train
        r = run_cli("finetune", tmp_path / "p", "--output", ck, "--modalities", mods, "--epochs", "1",
                    "--hidden-size", "16", "--batch-size", "4", *extra)
        assert r.exit_code == 0, (task, mods, r.output)
        predictor = Predictor(str(ck), device="cpu")
        assert "transcript" in predictor.encoders, (task, mods)
        records = [x for x in raw_records(str(manifest), predictor.config) if isinstance(x, dict)]
        featurized, errors = featurize(records, predictor.encoders, predictor.prep)
        assert not errors and {row["id"]: row["transcript"] for row in featurized} == \
            {i: prepared[i]["transcript"] for i in prepared}, (task, mods)
        mine = {row["id"]: row for row in featurized}
        if task == "generate":  # the decoder's prompts (text + what was said) are the same tokens as from prepare
            from mmllm.tasks.generate import GenTable

            gen_mods = predictor.model.cfg.modalities
            cols = {k: [mine[i].get(k) for i in test_ids] for k in mine[test_ids[0]]}
            ours = GenTable(cols, gen_mods, predictor.tokenizer, with_targets=False).prompts
            theirs = GenTable.from_split(ds["test"], gen_mods, predictor.tokenizer, with_targets=False)
            assert ours == theirs.prompts and list(theirs.ids) == test_ids, (task, mods)
        else:  # the text model's tokens: text [SEP] transcript, as prepare made them
            assert all(list(mine[i]["input_ids"]) == prepared[i]["input_ids"] for i in test_ids), (task, mods)
        gen = ["--max-new-tokens", "6"] if task == "generate" else []
        evals = []
        for data in (manifest, tmp_path / "p"):
            r = run_cli("eval", "model", ck, data, "--split", "test", "--no-reliance", *gen)
            assert r.exit_code == 0, (task, mods, r.output)
            evals.append(json.loads(r.stdout.splitlines()[-1]))
        r = run_cli("predict", ck, manifest, "--top-k", "2", *gen)
        assert r.exit_code == 0, (task, mods, r.output)
        predicted = {x["id"]: x for x in load_json_lines(r.stdout)}
        on_raw, on_prepared = evals
        if task == "generate":
            assert on_raw["examples"] == on_prepared["examples"], (task, mods)
            assert [e["generated"] for e in on_raw["examples"]] == [predicted[i]["generated"] for i in test_ids]
            assert on_raw["bleu"] == on_prepared["bleu"]
        else:
            for key in ("accuracy", "macro_f1", "confusion_matrix"):
                assert on_raw[key] == on_prepared[key], (task, mods, key)
            labels = on_raw["confusion_matrix"]["labels"]
            probs = np.array([[next(t["probability"] for t in predicted[i]["top_k"] if t["label"] == lab)
                               for lab in labels] for i in test_ids])
            gold = np.array([labels.index(prepared[i]["label"] if isinstance(prepared[i]["label"], str)
                                          else ds["test"].features["label"].int2str(prepared[i]["label"]))
                             for i in test_ids])
            assert float((probs.argmax(1) == gold).mean()) == on_raw["accuracy"]
            assert expected_calibration_error(probs, gold) == pytest.approx(on_raw["ece"], abs=1e-6)
            assert on_raw["ece"] == pytest.approx(on_prepared["ece"], abs=1e-6)


def test_relative_and_absolute_inputs_behave_the_same(tiny_models, tmp_path, monkeypatch):
    """A class folder and a manifest given as relative paths (from the cwd) give what their absolute paths give, in
    prepare, eval model, predict and serve (--media-root relative)."""
    import os
    import socket
    import subprocess
    import sys
    import time

    from conftest import ROOT, write_csv, write_image

    rows = []
    for i in range(16):
        cls = ["red", "blue"][i % 2]
        (tmp_path / "data" / "shapes" / cls).mkdir(parents=True, exist_ok=True)
        write_image(tmp_path / "data" / "shapes" / cls / f"s{i}.png", (200, 30, 30) if i % 2 == 0 else (30, 30, 200))
        rows.append({"id": f"r{i}", "image": f"shapes/{cls}/s{i}.png", "label": cls})
    write_csv(tmp_path / "data" / "m.csv", rows)
    monkeypatch.chdir(tmp_path)
    img = ["--image-model", tiny_models["image"]]
    summaries = []
    for name, data in (("rel", "data/shapes"), ("abs", tmp_path / "data" / "shapes"), ("man", "data/m.csv")):
        r = run_cli("prepare", data, "--output", f"p-{name}", *img)
        assert r.exit_code == 0, r.output
        summaries.append(json.loads(r.stdout.splitlines()[-1]))
    assert summaries[0]["counts"] == summaries[1]["counts"] and sum(summaries[0]["counts"].values()) == 16
    r = run_cli("finetune", "p-rel", "--output", "ck", "--epochs", "1", "--hidden-size", "16")
    assert r.exit_code == 0, r.output
    outputs = {}
    for data in ("data/shapes", str(tmp_path / "data" / "shapes"), "data/m.csv", str(tmp_path / "data" / "m.csv")):
        r = run_cli("predict", "ck", data)
        assert r.exit_code == 0, (data, r.output)
        lines = load_json_lines(r.stdout)
        assert len(lines) == 16 and not any("error" in x for x in lines), (data, lines[:2])
        outputs[data] = sorted((x["prediction"], round(x["probability"], 6)) for x in lines)
        r = run_cli("eval", "model", "ck", data, "--no-reliance")
        assert r.exit_code == 0, (data, r.output)
        assert json.loads(r.stdout.splitlines()[-1])["n"] == 16
    assert len({tuple(v) for v in outputs.values()}) == 1
    # serve: --media-root given relative; a record names its file relative to it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "mmllm", "serve", "ck", "--port", str(port), "--media-root",
                             "data", "--quiet"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        import urllib.request

        body = json.dumps([{"id": "x", "image": "shapes/red/s0.png"}]).encode()
        deadline = time.time() + 60
        while True:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/predict", body,
                                             {"Content-Type": "application/json"})
                answer = json.loads(urllib.request.urlopen(req, timeout=10).read())
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-2000:]
                time.sleep(0.3)
    finally:
        proc.terminate()
        proc.wait(10)
    answer = answer[0]  # a list in, a list out
    via_predict = {x["id"]: x for x in load_json_lines(run_cli("predict", "ck", "data/shapes").stdout)}["red/s0.png"]
    assert answer["prediction"] == via_predict["prediction"]
    assert answer["probability"] == pytest.approx(via_predict["probability"], abs=1e-6)


LONE = '"\\ud800"'  # valid JSON, but no character: Python reads it as a lone surrogate, which has no UTF-8


def test_a_lone_surrogate_is_that_records_error_in_predict(trained_checkpoint, tmp_path):
    lines = ['{"id": LONE, "text": "hi"}', '{"id": "b", "text": "it is big"}', '{"id": "c", "text": "it is \\ud800"}',
             '{"id": "d", "text": "it is small", "label": LONE}', '{"id": "e", "text": "it is small"}']
    lines = [line.replace("LONE", LONE) for line in lines]
    r = run_cli("predict", trained_checkpoint, "-", input="\n".join(lines) + "\n")
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    out = load_json_lines(r.stdout)
    assert [x["id"] for x in out] == ["\ufffd", "b", "c", "d", "e"]
    assert "column id: lone surrogate U+D800 at character 1" in out[0]["error"]
    assert "column text: lone surrogate U+D800 at character 7" in out[2]["error"]
    assert "column label: lone surrogate" in out[3]["error"]
    assert "prediction" in out[1] and "prediction" in out[4]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")  # to a file, through --output, alike
    r = run_cli("predict", trained_checkpoint, tmp_path / "in.jsonl", "--output", tmp_path / "out.jsonl")
    assert r.exit_code == 1 and load_json_lines((tmp_path / "out.jsonl").read_text(encoding="utf-8")) == out
    import mmllm

    got = mmllm.load(trained_checkpoint, device="cpu", quiet=True).predict(
        [{"id": "\ud800", "text": "hi"}, {"id": "b", "text": "it is big"}])
    assert got[0]["id"] == "\ufffd" and "lone surrogate" in got[0]["error"] and "prediction" in got[1]


@pytest.mark.parametrize("column", ["id", "label", "text"])
def test_a_lone_surrogate_is_that_records_error_in_prepare(tiny_models, tmp_path, column):
    rows = [{"id": f"r{i}", "text": ["it is big", "it is small"][i % 2], "label": "bs"[i % 2]} for i in range(12)]
    lines = [json.dumps(r) for r in rows]
    lines[3] = lines[3].replace({"id": '"r3"', "label": '"s"', "text": '"it is small"'}[column], LONE)
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    r = run_cli("prepare", tmp_path / "m.jsonl", "--output", tmp_path / "p", "--text-model", tiny_models["text"])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    summary = json.loads(r.stdout.splitlines()[-1])
    assert sum(summary["counts"].values()) == 11
    meta = json.loads((tmp_path / "p" / "mmllm-prepared.json").read_text(encoding="utf-8"))
    (skipped,) = meta["skipped"]
    assert skipped["row"] == 4 and skipped["column"] == column and "lone surrogate U+D800" in skipped["reason"]
    assert skipped["id"] == ("\ufffd" if column == "id" else "r3")


def one_line(r) -> str:
    """The single stderr line of a user error: exit 2, no traceback."""
    lines = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith("frozen encoders")]
    assert r.exit_code == 2 and len(lines) == 1 and "Traceback" not in r.output, r.output
    return lines[0]


def test_damaged_prepared_folders_are_one_line_naming_them(trained_checkpoint, tmp_path):
    import shutil

    source = trained_checkpoint.parent / "p"
    garbage = tmp_path / "garbage"
    shutil.copytree(source, garbage)
    for arrow in (garbage / "train").glob("*.arrow"):
        arrow.write_bytes(b"\x00garbage, not an Arrow stream" * 10)
    for args in (["finetune", garbage, "--output", tmp_path / "o"], ["eval", "model", trained_checkpoint, garbage]):
        line = one_line(run_cli(*args))
        assert f"{garbage}: the prepared data cannot be read" in line and "prepare it again" in line, line
    no_encoders = tmp_path / "no_encoders"
    shutil.copytree(source, no_encoders)
    meta = json.loads((no_encoders / "mmllm-prepared.json").read_text())
    del meta["encoders"]
    (no_encoders / "mmllm-prepared.json").write_text(json.dumps(meta))
    line = one_line(run_cli("finetune", no_encoders, "--output", tmp_path / "o"))
    assert line.endswith(f"{no_encoders / 'mmllm-prepared.json'} has no 'encoders' (edited or damaged): prepare it "
                         "again"), line


def test_empty_files_and_a_folder_in_eval_scores_are_one_line(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "one.txt").write_text("a\n")
    line = one_line(run_cli("eval", "accuracy", "--pred", tmp_path / "empty.txt", "--gold", tmp_path / "empty.txt"))
    assert line.endswith(f"--pred {tmp_path / 'empty.txt'}: no records (an empty file): nothing to score")
    line = one_line(run_cli("eval", "bleu", "--hyp", tmp_path / "empty.txt", "--ref", tmp_path / "empty.txt"))
    assert line.endswith(f"--hyp {tmp_path / 'empty.txt'}: no lines (an empty file): nothing to score")
    line = one_line(run_cli("eval", "bleu", "--hyp", tmp_path, "--ref", tmp_path / "one.txt"))
    assert line.endswith(f"{tmp_path} is a folder: expected a file of lines or JSON lines"), line


def test_huge_or_deeply_nested_checkpoint_json_is_one_line(trained_checkpoint, tmp_path):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(trained_checkpoint, ck)
    config = ck / "config.json"
    with open(config, "r+b") as f:  # 500 MB, sparse: a reader that reads it whole would take 500 MB
        f.truncate(500 << 20)
    line = one_line(run_cli("predict", ck, "-", input='{"text": "hi"}\n'))
    assert f"{config} is 500 MB, more than the 64 MB a JSON file of mmllm has: not read" in line, line
    config.write_text("[" * 200_000 + "]" * 200_000)
    line = one_line(run_cli("predict", ck, "-", input='{"text": "hi"}\n'))
    assert line.endswith(f"{config}: JSON nested too deeply to read (the file was edited or damaged)"), line
    (tmp_path / "ck" / "config.json").write_text((trained_checkpoint / "config.json").read_text())
    (ck / "labels.json").write_text("{" * 100_000)
    line = one_line(run_cli("predict", ck, "-", input='{"text": "hi"}\n'))
    assert str(ck / "labels.json") in line and ("nested too deeply" in line or "corrupt JSON" in line), line


def test_model_predict_of_a_string_is_a_type_error(trained_checkpoint):
    import mmllm

    model = mmllm.load(trained_checkpoint, device="cpu", quiet=True)
    for wrong in ("hello", b"hello", 3, None):  # a str is a manifest's path: "hello" names none
        with pytest.raises(TypeError) as e:
            model.predict(wrong)
        assert str(e.value).startswith("Model.predict takes a record (dict), a list of records, a pandas DataFrame")
        assert ("no file or folder has that name" if wrong == "hello" else f"not a {type(wrong).__name__}") \
            in str(e.value) and "hello" not in str(e.value)
    assert "prediction" in model.predict({"text": "it is big"})
