"""The Python API: the same steps, validation and results as the CLI; `import mmllm` stays light."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, load_json_lines, run_cli


def test_import_is_light_and_the_api_functions_are_plain_functions():
    code = ("import sys, inspect, types, mmllm; heavy = [m for m in ('torch', 'transformers', 'datasets', 'numpy') "
            "if m in sys.modules]; import mmllm.preparation, mmllm.finetuning;"
            "print(heavy, type(mmllm).__name__, [isinstance(f, types.FunctionType) for f in "
            "(mmllm.prepare, mmllm.finetune, mmllm.evaluate)], mmllm.FinetuneConfig.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "[] module [True, True, True] FinetuneConfig", out.stderr


def test_api_signatures_show_the_config_options():
    import dataclasses
    import inspect

    import mmllm

    for func, cls, first in ((mmllm.prepare, mmllm.PrepareConfig, ["input", "output"]),
                             (mmllm.finetune, mmllm.FinetuneConfig, ["prepared", "output"]),
                             (mmllm.evaluate, mmllm.EvalModelConfig, ["checkpoint", "data"])):
        params = inspect.signature(func).parameters
        assert list(params)[:2] == first and "options" not in params
        fields = {f.name: f for f in dataclasses.fields(cls)}
        assert set(fields) - set(first) <= set(params), sorted(set(fields) - set(params))
        for name, f in fields.items():
            if name not in first and f.default is not dataclasses.MISSING:
                assert params[name].default == f.default, name
                assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert func.__doc__ and func.__module__ == "mmllm.api"
    assert inspect.signature(mmllm.finetune).parameters["epochs"].default == mmllm.FinetuneConfig().epochs
    assert "lr" in str(inspect.signature(mmllm.finetune)) and "text_model" in str(inspect.signature(mmllm.prepare))


def test_configs_are_validated_like_the_cli(tmp_path):
    import mmllm
    from mmllm.errors import UserError

    with pytest.raises(UserError) as e:
        mmllm.finetune(tmp_path, tmp_path / "o", fusion="magic", dropout=2.0)
    assert "--fusion: 'magic' is not one of concat, gated, attention" in str(e.value) and "--dropout" in str(e.value)
    with pytest.raises(UserError) as e:  # as README says: every mistake is a UserError, close names suggested
        mmllm.finetune(tmp_path, tmp_path / "o", fusionn="gated", zzz=1)
    first, second = str(e.value).split("; ")
    assert first == "FinetuneConfig: unknown option 'fusionn' (did you mean fusion?)"
    assert second.startswith("FinetuneConfig: unknown option 'zzz' (options: ") and ", epochs, " in second
    with pytest.raises(UserError, match=r"unknown option 'topk' \(did you mean top_k or stop or top_p\?\)"):
        mmllm.make_config(mmllm.PredictConfig, checkpoint="ck", topk=2)  # = Model.predict's options
    with pytest.raises(UserError, match=r"^--config: unknown option 'ouptut' \(did you mean output\?\)$"):
        mmllm.config.build(mmllm.PrepareConfig, {"ouptut": "o"}, {"input": ["x.csv"], "output": "o"})  # --config keys
    cfg = mmllm.make_config(mmllm.FinetuneConfig, mmllm.FinetuneConfig(prepared="p", output="o", lr=1), epochs=3)
    assert (cfg.lr, cfg.epochs, cfg.fusion) == (1.0, 3, "auto") and isinstance(cfg.lr, float)


def test_prepare_finetune_predict_match_the_cli(tiny_models, tmp_path):
    import mmllm

    rows = [{"id": f"r{i}", "text": ["it is big", "it is small", "a red thing"][i % 3], "label": "bsr"[i % 3]}
            for i in range(30)]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    summary = mmllm.prepare(tmp_path / "m.jsonl", tmp_path / "p", text_model=tiny_models["text"], max_text_tokens=16,
                            quiet=True)
    assert summary["output"] == str(tmp_path / "p") and sum(summary["counts"].values()) == 30
    config = mmllm.FinetuneConfig(hidden_size=16, epochs=2, batch_size=8)
    result = mmllm.finetune(tmp_path / "p", tmp_path / "ck", config=config, quiet=True)
    assert result["epochs"] == 2 and result["output"] == str(tmp_path / "ck")
    assert result == json.loads((tmp_path / "ck" / "metrics.json").read_text())  # the summary the CLI writes
    records = [{"id": "a", "text": "it is big"}, {"id": "b", "text": "a red thing"}, {"id": "c"},
               {"text": "it is small"}]
    model = mmllm.load(tmp_path / "ck", device="cpu")
    got = model.predict(records, top_k=2)
    stdin = "\n".join(json.dumps(r) for r in records) + "\n"
    cli = run_cli("predict", str(tmp_path / "ck"), "-", "--top-k", "2", input=stdin)
    assert got == load_json_lines(cli.stdout)  # the very dicts the CLI writes
    assert [g["id"] for g in got] == ["a", "b", "c", "row4"] and "error" in got[2]
    assert got[0]["prediction"] in model.labels and len(got[0]["top_k"]) == 2
    alone = model.predict({"text": "it is big"})  # a batch of one: the frozen text states without padding (1e-7)
    assert alone == pytest.approx({k: v for k, v in got[0].items() if k != "top_k"} | {"id": "row1"}, abs=1e-6)
    assert records[0] == {"id": "a", "text": "it is big"}  # the caller's records are untouched


def test_quiet_silences_the_encoder_note_in_the_cli_and_the_api(trained_checkpoint, capsys):
    import mmllm

    line = '{"id": "a", "text": "it is big"}\n'
    assert "frozen encoders:" in run_cli("predict", str(trained_checkpoint), "-", input=line).stderr
    for args in (["predict", "--quiet"], ["--quiet", "predict"], ["predict", "-q"]):
        r = run_cli(*args, str(trained_checkpoint), "-", input=line)
        assert r.exit_code == 0 and r.stderr == "" and load_json_lines(r.stdout)[0]["id"] == "a", (args, r.stderr)
    capsys.readouterr()
    model = mmllm.load(trained_checkpoint, device="cpu", quiet=True)
    assert model.predict({"text": "it is big"})["prediction"] in model.labels
    assert capsys.readouterr().err == ""
    mmllm.load(trained_checkpoint, device="cpu")
    assert "frozen encoders:" in capsys.readouterr().err


def test_predict_takes_dataframes_paths_arrays_and_audio_tuples(prepared, tmp_path):
    import numpy as np
    import pandas as pd
    import soundfile as sf
    from PIL import Image

    import mmllm

    ckpt = tmp_path / "ck"
    assert run_cli("finetune", str(prepared), "--output", str(ckpt), "--epochs", "1", "--hidden-size", "16",
                   "--fusion", "concat").exit_code == 0
    root = prepared.parent
    model = mmllm.load(ckpt, device="cpu", quiet=True)
    assert model.warm_s > 0
    paths = [{"id": f"q{i}", "text": "it is big", "image": f"media/img{i}.png", "audio": f"media/a{i}.wav"}
             for i in range(3)]
    want = model.predict(paths, base=root)
    assert all("prediction" in w for w in want), want
    assert model.predict(pd.DataFrame(paths), base=root) == want
    (root / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in paths))
    assert model.predict(root / "q.jsonl") == model.predict(str(root / "q.jsonl")) == want
    held = []
    for r in paths:
        img = Image.open(root / r["image"]).convert("RGB")
        samples, sr = sf.read(root / r["audio"], dtype="float32")
        held.append([{**r, "image": (root / r["image"]).read_bytes(), "audio": (samples, sr)},
                     {**r, "image": img, "audio": {"array": samples, "sampling_rate": sr}},
                     {**r, "image": np.asarray(img), "audio": (root / r["audio"]).read_bytes()},
                     {**r, "image": np.asarray(img) / 255.0, "audio": [samples, sr]}])
    for n in range(4):
        got = model.predict([h[n] for h in held], base=root)
        assert [g["prediction"] for g in got] == [w["prediction"] for w in want], n
        assert [g["probability"] for g in got] == pytest.approx([w["probability"] for w in want], abs=1e-5), n
    one = model.predict(held[0][2])
    assert isinstance(one, dict) and one["prediction"] == want[0]["prediction"]
    arr = np.asarray(Image.open(root / "media/img0.png"))
    for wrong, kind, words in (
            (np.zeros((2, 3)), TypeError, "not a ndarray"),
            ([paths[0], "media/img0.png"], TypeError, "item 2 is a str"),
            ([{"text": "x", "image": [1, 2]}], TypeError, "record 1, key 'image': an image is a path, bytes"),
            ([{"text": "x", "audio": np.zeros(8000, np.float32)}], TypeError, "needs its sampling rate"),
            ([{"text": "x", "image": arr * 3.0}], ValueError, "values in [0, 1]"),
            ([{"text": "x", "image": arr[:, :, :2]}], ValueError, "H x W [x 1, 3 or 4]"),
            ([{"text": "x", "audio": (np.zeros(800, np.float32), float("inf"))}], ValueError, "from 1 to 768000"),
            ([{"text": "x", "audio": (np.zeros(800, np.float32), 2 ** 40)}], ValueError, "from 1 to 768000"),
            ([{"text": "x", "audio": (np.full(800, np.nan, np.float32), 16000)}], ValueError, "NaN or Inf"),
            ([{"text": "x", "audio": ("media/a0.wav", "media/a1.wav")}], TypeError, "not a tuple")):
        with pytest.raises(kind) as e:
            model.predict(wrong)
        assert words in str(e.value) and "[[" not in str(e.value) and "0." not in str(e.value), str(e.value)
    loud = model.predict({"id": "loud", "text": "x", "audio": (np.full(16000, 1e30, np.float32), 16000)})
    assert set(loud) == {"id", "error"} and "beyond 1000 x full scale" in loud["error"], loud


def test_steps_never_mutate_the_config_they_are_given(tiny_models, tmp_path):
    """A resolved plan is a new config (prepare's transcribe/max_text_tokens, finetune's epochs from the budget):
    the caller's object stays as it was built, so one config can be run twice."""
    import dataclasses

    from mmllm import finetuning, preparation
    from mmllm.config import FinetuneConfig, PrepareConfig, build

    rows = [{"id": f"r{i}", "text": ["it is big", "it is small"][i % 2], "label": "bs"[i % 2]} for i in range(20)]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pcfg = build(PrepareConfig, {}, {"input": [str(tmp_path / "m.jsonl")], "output": str(tmp_path / "p"),
                                     "text_model": str(tiny_models["text"])})  # 128 tokens: over its 64
    before = dataclasses.asdict(pcfg)
    assert preparation.run(pcfg) == 0
    assert dataclasses.asdict(pcfg) == before and pcfg.transcribe is None and pcfg.max_text_tokens == 128
    saved = json.loads((tmp_path / "p" / "prepare_config.json").read_text())
    assert saved["max_text_tokens"] == 64 and saved["transcribe"] is False  # the resolved values are recorded
    fcfg = build(FinetuneConfig, {}, {"prepared": str(tmp_path / "p"), "output": str(tmp_path / "ck"),
                                      "hidden_size": 16, "budget_steps": 6, "batch_size": 8})
    before = dataclasses.asdict(fcfg)
    assert fcfg.epochs is None and finetuning.run(fcfg) == 0
    assert dataclasses.asdict(fcfg) == before
    assert json.loads((tmp_path / "ck" / "finetune_config.json").read_text())["epochs"] >= 1
