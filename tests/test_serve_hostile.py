"""`mmllm serve` treats every request as hostile: real servers on free loopback ports, raw sockets where a
well-behaved client library would hide the attack. Each test is bounded in requests and seconds."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, one_line_error, run_cli, tiny_prepare_args, write_csv, write_image, write_wav

requests = pytest.importorskip("requests")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def site(tiny_models, tmp_path_factory) -> dict:
    """A text+image+audio checkpoint, a media root with files, a symlink out of it, and a fake home folder."""
    top = tmp_path_factory.mktemp("hostile")
    data = top / "data"
    (data / "media").mkdir(parents=True)
    rows = []
    for i in range(16):
        write_image(data / "media" / f"img{i}.png", (200, 30, 30) if i % 2 else (30, 30, 200))
        write_wav(data / "media" / f"a{i}.wav", freq=300 + 40 * (i % 3))
        rows.append({"id": f"r{i}", "text": ["it is big", "it is small"][i % 2], "image": f"media/img{i}.png",
                     "audio": f"media/a{i}.wav", "label": ["red", "blue"][i % 2]})
    manifest = write_csv(data / "manifest.csv", rows)
    home = top / "mmllm_home"
    home.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMLLM_HOME", str(home))
        assert run_cli(*tiny_prepare_args(tiny_models, manifest, top / "prep")).exit_code == 0
        r = run_cli("finetune", str(top / "prep"), "--output", str(top / "ck"), "--modalities", "text,image,audio",
                    "--epochs", "1", "--hidden-size", "16")
        assert r.exit_code == 0, r.output
    outside = write_image(top / "outside.png")
    root = top / "root"
    (root / "sub").mkdir(parents=True)
    write_image(root / "sub" / "ok.png")
    write_wav(root / "sub" / "ok.wav")
    (root / "sub" / "bad.png").write_bytes(b"not an image at all")
    (root / "escape.png").symlink_to(outside)
    user_home = top / "user_home"
    user_home.mkdir()
    write_image(user_home / "secret.png")
    return {"ckpt": top / "ck", "home": home, "root": root, "outside": outside, "user_home": user_home,
            "media": data / "media", "top": top}


@contextlib.contextmanager
def serving(site: dict, *flags: str):
    """A `mmllm serve` subprocess on a free loopback port: yields (url, port, stderr file)."""
    port = free_port()
    log = site["top"] / f"serve-{port}.log"
    env = {**os.environ, "MMLLM_HOME": str(site["home"]), "OMP_NUM_THREADS": "1", "HOME": str(site["user_home"])}
    with open(log, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "mmllm", "serve", str(site["ckpt"]), "--port", str(port),
                                 *flags], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if requests.get(url + "/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(log.read_text()[-2000:])
            time.sleep(0.3)
        yield url, port, log
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture(scope="module")
def plain(site):
    """A server started without --media-root (the default)."""
    with serving(site, "--batch-wait-ms", "1500") as s:
        yield s


ROOTED_LIMITS: list[str] = []  # the limits of the later points join here


@pytest.fixture(scope="module")
def rooted(site):
    """A server with --media-root and small limits."""
    with serving(site, "--media-root", str(site["root"]), "--batch-wait-ms", "20", *ROOTED_LIMITS) as s:
        yield s


def assert_no_server_path(text: str, site: dict) -> None:
    for secret in (str(site["top"]), str(ROOT), "/etc/", "/root"):
        assert secret not in text, text


def test_server_side_paths_are_refused_without_media_root(plain, site):
    url, _, _ = plain
    img, wav = site["media"] / "img1.png", site["media"] / "a1.wav"
    attempts = [{"image": str(img)}, {"audio": str(wav)}, {"img": str(img)}, {"photo": "/etc/passwd"},
                {"image": {"path": str(img)}}, {"image": {"bytes": "/etc/passwd"}}, {"image": "~/secret.png"},
                {"wav": "../../etc/hostname"}]
    for n, media in enumerate(attempts):
        r = requests.post(url + "/predict", json={"id": f"p{n}", "text": "it is big", **media}, timeout=30)
        assert r.status_code == 422, (media, r.text)
        assert "--media-root" in r.json()["error"] and r.json()["id"] == f"p{n}", r.text
        assert_no_server_path(r.text, site)
    form = requests.post(url + "/predict", files={"id": (None, "f"), "text": (None, "it is big"),
                                                  "image": (None, str(img))}, timeout=30)  # a text field
    assert form.status_code == 422 and "--media-root" in form.json()["error"], form.text
    # the media themselves still work: base64, a data: URI, an upload
    b64 = base64.b64encode(img.read_bytes()).decode()
    for body in ({"id": "b", "text": "it is big", "image_base64": b64, "audio_base64":
                  base64.b64encode(wav.read_bytes()).decode()},
                 {"id": "u", "text": "it is big", "img": "data:image/png;base64," + b64}):
        r = requests.post(url + "/predict", json=body, timeout=30)
        assert r.status_code == 200 and "prediction" in r.json(), r.text
    r = requests.post(url + "/predict", data={"id": "m", "text": "it is big"},
                      files={"image": ("x.png", img.read_bytes(), "image/png")}, timeout=30)
    assert r.status_code == 200 and "prediction" in r.json(), r.text


def test_media_root_serves_only_regular_files_inside_it(rooted, site):
    url, _, _ = rooted
    root = site["root"]
    for ok in ({"image": "sub/ok.png"}, {"image": str(root / "sub" / "ok.png")}, {"audio": "sub/ok.wav"},
               {"img": "sub/../sub/ok.png"}):
        r = requests.post(url + "/predict", json={"id": "ok", "text": "it is big", **ok}, timeout=30)
        assert r.status_code == 200 and "prediction" in r.json(), (ok, r.text)
    refused = {"escape.png": "outside", "../outside.png": "outside", str(site["outside"]): "outside",
               "/etc/passwd": "outside", "/root": "outside", "../../etc/hostname": "outside",
               "~root/.bashrc": "not found", "~/secret.png": "not found", "sub": "not a regular file",
               "sub/missing.png": "not found", "a\0b": "outside"}
    for key in ("image", "audio", "photo"):
        for path, why in refused.items():
            r = requests.post(url + "/predict", json={"id": "x", "text": "hi", key: path}, timeout=30)
            assert r.status_code == 422 and why in r.json()["error"], (key, path, r.text)
            assert_no_server_path(r.text, site)
    r = requests.post(url + "/predict", json={"id": "bad", "image": "sub/bad.png"}, timeout=30)
    assert r.status_code == 422 and "not an image" in r.json()["error"], r.text
    assert_no_server_path(r.text, site)


def test_predict_cli_still_reads_local_paths(site, tmp_path, monkeypatch):
    monkeypatch.setenv("MMLLM_HOME", str(site["home"]))
    rec = {"id": "local", "text": "it is big", "image": str(site["outside"])}
    r = run_cli("predict", str(site["ckpt"]), "-", input=json.dumps(rec) + "\n")
    assert r.exit_code == 0 and "prediction" in json.loads(r.stdout), r.output


def test_a_media_root_that_is_not_a_folder_is_one_line(site):
    line = one_line_error(run_cli("serve", str(site["ckpt"]), "--media-root", str(site["outside"])))
    assert "--media-root" in line


def test_port_out_of_range_is_exit_2_before_the_model_loads(site):
    started = time.monotonic()
    line = one_line_error(run_cli("serve", str(site["ckpt"]), "--port", "70000"))
    assert "--port" in line and "70000" in line
    assert time.monotonic() - started < 2  # refused by the config check, no model built
