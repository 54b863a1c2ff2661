import json
import subprocess
import sys

from conftest import ROOT, run_cli


def test_help_lists_every_command():
    r = run_cli("--help")
    assert r.exit_code == 0
    for cmd in ("prepare", "finetune", "eval", "predict", "models"):
        assert cmd in r.stdout
    for sub in (["eval", "--help"], ["models", "--help"]):
        out = run_cli(*sub).stdout
        assert all(w in out for w in (["model", "bleu", "fid", "accuracy"] if sub[0] == "eval" else ["list", "pull"]))


def test_help_does_not_import_torch():
    code = "import sys; from mmllm.cli import app; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT).stdout
    assert out.strip() == "False False"


def test_version():
    r = run_cli("--version")
    assert r.exit_code == 0 and r.stdout.startswith("mmllm 0.")


def test_python_dash_m():
    r = subprocess.run([sys.executable, "-m", "mmllm", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "mmllm" in r.stdout


def test_user_error_is_one_line_exit_2(tmp_path):
    r = run_cli("prepare", str(tmp_path / "missing.csv"), "--output", str(tmp_path / "o"))
    assert r.exit_code == 2
    assert r.stdout == ""
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "input not found" in lines[0] and "Traceback" not in r.stderr


def test_bad_flag_values_reported_together(tmp_path):
    r = run_cli("finetune", str(tmp_path), "--output", str(tmp_path / "o"), "--fusion", "magic", "--dropout", "2",
                "--modalities", "text,smell")
    assert r.exit_code == 2
    for flag in ("--fusion", "--dropout", "--modalities"):
        assert flag in r.stderr


def test_config_file_and_flag_override(tmp_path, monkeypatch):
    import mmllm.preparation as prepare

    seen = {}
    monkeypatch.setattr(prepare, "run", lambda cfg: seen.setdefault("cfg", cfg) and 0)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("output: from_file\nbatch-size: 7\nmax_text_tokens: 50\n")
    r = run_cli("prepare", "x.csv", "--config", str(cfg), "--batch-size", "9")
    assert r.exit_code == 0, r.output
    c = seen["cfg"]
    assert (c.output, c.batch_size, c.max_text_tokens) == ("from_file", 9, 50)
    (tmp_path / "c.json").write_text(json.dumps({"output": "o", "nonsense": 1}))
    r = run_cli("prepare", "x.csv", "--config", str(tmp_path / "c.json"))
    assert r.exit_code == 2 and "unknown option 'nonsense'" in r.stderr
    (tmp_path / "b.yaml").write_text("ref: r.txt\n")  # a single value for a repeatable option
    (tmp_path / "h.txt").write_text("a b c\n")
    r = run_cli("eval", "bleu", "--config", str(tmp_path / "b.yaml"), "--hyp", str(tmp_path / "h.txt"))
    assert r.exit_code == 2 and "file not found: r.txt" in r.stderr  # the whole name, not its first letter


def test_unknown_model_is_one_line(tmp_path, toy_manifest, tiny_models):
    r = run_cli("prepare", str(toy_manifest), "--output", str(tmp_path / "o"), "--image-model", "no-such-model",
                "--text-model", str(tiny_models["text"]), "--audio-model", "logmel")
    assert r.exit_code == 2
    assert "unknown model 'no-such-model'" in r.stderr and "Traceback" not in r.stderr


def test_models_list_json():
    r = run_cli("models", "list")
    assert r.exit_code == 0
    rows = json.loads(r.stdout)["models"]
    names = {m["name"]: m for m in rows}
    assert {"minilm", "efficientnet-lite0", "whisper-tiny.en", "smollm2-135m", "logmel", "mfcc"} <= set(names)
    assert names["minilm"]["role"] == "text" and names["logmel"]["ready"] is True


def test_missing_model_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MMLLM_HOME", str(tmp_path / "empty"))
    from mmllm.encoders import resolve
    from mmllm.errors import UserError

    try:
        resolve("minilm")
    except UserError as e:
        assert "mmllm models pull minilm" in str(e)
    else:
        raise AssertionError("expected a UserError")


# ---------------------------------------------------------------- help: defaults, choices, panels, 80 columns

def _help(args: list[str], width: int) -> str:
    from typer.testing import CliRunner

    from mmllm.cli import app

    r = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": str(width)}, terminal_width=width)
    assert r.exit_code == 0, r.output
    return r.stdout


def _commands():
    from mmllm import config as C

    named = {"PrepareConfig": ["prepare"], "FinetuneConfig": ["finetune"], "PredictConfig": ["predict"],
             "ServeConfig": ["serve"], "EvalModelConfig": ["eval", "model"], "BleuConfig": ["eval", "bleu"],
             "WerConfig": ["eval", "wer"], "FidConfig": ["eval", "fid"], "AccuracyConfig": ["eval", "accuracy"]}
    configs = [name for name, v in vars(C).items() if name.endswith("Config") and isinstance(v, type)]
    assert set(configs) <= set(named), f"a new command config: add it here {set(configs) - set(named)}"
    return [(named[name], getattr(C, name)) for name in configs]


def test_help_at_80_columns_shows_every_flag_uncut():
    import dataclasses
    import re

    from mmllm.config import flag

    for args, cls in _commands():
        out = _help(args, 80)
        assert max(len(line) for line in out.splitlines()) <= 80, args
        assert "…" not in out  # rich's ellipsis: something was cut
        for f in dataclasses.fields(cls):
            if f.metadata["argument"]:
                assert re.search(rf"(?m)^│ {f.name.upper()}\b", out), (args, f.name)
                continue
            names = [flag(f.name)] + (["--no-" + f.name.replace("_", "-")] if f.type == "bool" else [])
            for name in names:
                assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", out), (args, name)
        for name in ("--config", "--quiet, -q", "--debug", "--help"):
            assert name in out


def test_help_shows_defaults_choices_and_panels():
    import dataclasses

    out = _help(["finetune"], 300)  # wide: no help line wraps
    from mmllm.config import FinetuneConfig

    for f in dataclasses.fields(FinetuneConfig):
        if f.type == "bool":
            assert f"[default: {'on' if f.default else 'off'}]" in out, f.name
        elif f.default not in (None, dataclasses.MISSING):
            assert f"[default: {f.default}]" in out, f.name
        if f.metadata["choices"]:
            assert f"[choices: {', '.join(f.metadata['choices'])}]" in out, f.name
    assert "[choices: concat, gated, attention, transformer, bilinear, auto] [default: auto]" in out
    assert "[choices: fp32, bf16, fp16] [default: fp32]" in out
    titles = [line.split("─", 2)[1].strip() for line in out.splitlines() if line.startswith("╭─")]
    assert titles == ["Arguments", "Model", "Training", "Early stopping", "Output", "Runtime", "Options"]
    prepare = _help(["prepare"], 300)
    titles = [line.split("─", 2)[1].strip() for line in prepare.splitlines() if line.startswith("╭─")]
    assert titles == ["Arguments", "Data", "Model", "Output", "Runtime", "Options"]
    assert "[default: efficientnet-lite0]" in prepare and "[default: on]" in prepare  # --cache


def test_every_config_field_has_a_known_panel():
    import dataclasses

    from mmllm.cli import PANELS

    for _, cls in _commands():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("panel") in PANELS, f"{cls.__name__}.{f.name}: opt(..., panel=...) missing"


def test_quiet_on_every_command():
    for args, _ in _commands():
        assert run_cli(*args, "-q", "--help").exit_code == 0, args
    for args in (["models", "list"], ["models", "pull", "logmel"]):
        loud, quiet = run_cli(*args), run_cli(*args, "-q")
        assert loud.exit_code == 0 and quiet.exit_code == 0, quiet.output
        assert json.loads(quiet.stdout) == json.loads(loud.stdout)
        assert quiet.stderr.strip() == ""
    assert "nothing to pull" in run_cli("models", "pull", "logmel").stderr


def test_help_of_groups_and_commands_shows_no_raw_type_names():
    import re

    groups = [[], ["eval"], ["models"]]
    for args in [*groups, *(a for a, _ in _commands()), ["models", "list"], ["models", "pull"]]:
        out = _help(args, 80)
        assert not re.search(r"<\w+>", out), (args, re.findall(r"<\w+>", out))  # typer's '<bool>' metavars
        assert max(len(line) for line in out.splitlines()) <= 80 and "…" not in out, args
    top = _help([], 80)
    assert "--quiet, -q" in top and "--version" in top
    for cmd in ("prepare", "finetune", "predict", "serve", "eval", "models"):
        assert re.search(rf"(?m)^│ {cmd}\s", top), cmd  # the Commands panel of a group
    assert re.search(r"(?m)^│ pull\s", _help(["models"], 80))


def test_models_list_at_80_columns_never_cuts_an_alias(tmp_path):
    import os
    import re

    from mmllm.hub import ALIASES

    for home in (None, tmp_path / "empty"):  # models ready, then none pulled (the pull command is shown)
        env = dict(os.environ, COLUMNS="80", PYTHONPATH=str(ROOT))
        if home:
            env["MMLLM_HOME"] = str(home)
        r = subprocess.run([sys.executable, "-m", "mmllm", "models", "list"], capture_output=True, text=True,
                           cwd=ROOT, env=env)
        assert r.returncode == 0, r.stderr
        lines = r.stderr.splitlines()
        table = [line for line in lines if line[:1] in "┏┃┡│└"]  # the title and notes are never cut, only long
        assert len(table) >= len(ALIASES) + 4 and max(len(line) for line in table) <= 80 and "…" not in r.stderr
        for alias in ALIASES:
            assert any(re.match(rf"│ {re.escape(alias)} +│", line) for line in lines), (alias, r.stderr)
        if home:
            pulled = [a.name for a in ALIASES.values() if a.source]
            assert f"mmllm models pull {' '.join(pulled)}" in r.stderr
        assert {m["name"] for m in json.loads(r.stdout)["models"]} == set(ALIASES)


def test_readme_lists_each_option_of_a_command_once_and_only_real_ones():
    import dataclasses
    import re
    from collections import Counter

    from mmllm import config as C

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("Useful options"):text.index("Speech content:")]
    bullets = {b.split("`")[1]: b for b in re.split(r"\n- ", section)[1:]}
    assert set(bullets) == {"prepare", "finetune", "predict", "serve"}
    for cmd, bullet in bullets.items():
        spans = [s for s in re.findall(r"`([^`]*)`", bullet) if not s.startswith("python ")]  # not bench commands
        flags = [f for span in spans for f in re.findall(r"--[a-z0-9][a-z0-9-]*", span)]
        twice = sorted(f for f, n in Counter(flags).items() if n > 1)
        assert not twice, f"README's {cmd} options name {twice} more than once"
        cls = {"prepare": C.PrepareConfig, "finetune": C.FinetuneConfig, "predict": C.PredictConfig,
               "serve": C.ServeConfig}[cmd]
        real = {C.flag(f.name) for f in dataclasses.fields(cls)}
        real |= {"--no-" + f.name.replace("_", "-") for f in dataclasses.fields(cls) if f.type == "bool"}
        assert set(flags) <= real, f"README's {cmd} options name flags it does not have: {set(flags) - real}"
