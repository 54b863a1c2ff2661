"""`mmllm serve` treats every request as hostile: real servers on free loopback ports, raw sockets where a
well-behaved client library would hide the attack. Each test is bounded in requests and seconds."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import time

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


ROOTED_LIMITS = ["--max-batch", "4", "--max-records", "8", "--max-request-mb", "1", "--request-timeout", "2",
                 "--timeout-keep-alive", "1", "--max-connections", "32", "--allow-host", "example.test"]


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


def raw(port: int, data: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(data)
    return s


def test_only_json_and_multipart_bodies_are_accepted(plain):
    url, _, _ = plain
    body = json.dumps({"id": "t", "text": "it is big"})
    for kind in ("text/plain", "application/x-www-form-urlencoded", None):
        r = requests.post(url + "/predict", data=body, headers={"content-type": kind} if kind else {}, timeout=30)
        assert r.status_code == 415 and "application/json" in r.json()["error"], (kind, r.text)
    r = requests.post(url + "/predict", data=body, headers={"content-type": "application/json; charset=utf-8"},
                      timeout=30)
    assert r.status_code == 200, r.text


def test_host_and_origin_must_name_the_server(plain, rooted):
    for url, port, _ in (plain, rooted):
        for host in ("evil.test", f"evil.test:{port}", f"127.0.0.1.evil.test:{port}", ""):
            r = requests.get(url + "/info", headers={"Host": host}, timeout=10)
            assert r.status_code == 421 and "--allow-host" in r.json()["error"], (host, r.text)
        r = requests.post(url + "/predict", json={"text": "hi"}, headers={"Host": "evil.test"}, timeout=10)
        assert r.status_code == 421
        for host in (f"localhost:{port}", f"[::1]:{port}", f"127.0.0.1:{port}", "LOCALHOST"):
            assert requests.get(url + "/health", headers={"Host": host}, timeout=10).status_code == 200, host
        for origin in ("http://evil.test", "null", f"http://evil.test:{port}"):
            r = requests.get(url + "/info", headers={"Origin": origin}, timeout=10)
            assert r.status_code == 403, (origin, r.text)
        assert requests.get(url + "/info", headers={"Origin": f"http://localhost:{port}"}, timeout=10).ok
    url, port, _ = rooted
    for host in ("example.test", f"Example.Test.:{port}"):  # --allow-host example.test
        assert requests.get(url + "/health", headers={"Host": host}, timeout=10).status_code == 200, host
    assert requests.get(url + "/health", headers={"Host": "example.test", "Origin": "http://example.test"},
                        timeout=10).status_code == 200


def test_lists_go_to_the_model_in_max_batch_calls_and_are_capped_at_max_records(rooted, site):
    url, _, _ = rooted
    (site["root"] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not a picture" * 10)
    before = requests.get(url + "/health", timeout=10).json()
    r = requests.post(url + "/predict", json=[{"id": f"l{i}", "text": "it is big"} for i in range(7)], timeout=30)
    assert r.status_code == 200 and [x["id"] for x in r.json()] == [f"l{i}" for i in range(7)], r.text
    assert int(r.headers["X-MMLLM-Batch-Records"]) <= 4  # --max-batch 4
    after = requests.get(url + "/health", timeout=10).json()
    assert (after["batches"] - before["batches"], after["records"] - before["records"]) == (2, 7)
    r = requests.post(url + "/predict", json=[{"id": "ok", "text": "it is big"}, {"id": "empty"}], timeout=30)
    assert r.status_code == 200 and "error" in r.json()[1], r.text  # nothing the model reads: refused before it
    counted = requests.get(url + "/health", timeout=10).json()  # the refused record is not counted as answered
    assert (counted["records"] - after["records"], counted["failed"] - after["failed"]) == (1, 0)
    r = requests.post(url + "/predict", json=[{"id": "ok", "text": "it is big"},
                                              {"id": "bad", "text": "it is", "image": "broken.png"}], timeout=30)
    assert r.status_code == 200 and "error" in r.json()[1] and "error" not in r.json()[0], r.text
    after = requests.get(url + "/health", timeout=10).json()  # the model was asked for it: answered with an error
    assert (after["records"] - counted["records"], after["failed"] - counted["failed"]) == (1, 1)
    r = requests.post(url + "/predict", json=[{"id": f"l{i}", "text": "it is big"} for i in range(9)], timeout=30)
    assert r.status_code == 413 and "--max-records" in r.json()["error"], r.text


def test_work_for_a_client_that_left_is_dropped(plain):
    url, port, _ = plain  # --batch-wait-ms 1500: the client leaves while its batch waits
    before = requests.get(url + "/health", timeout=10).json()["batches"]
    body = json.dumps([{"id": f"d{i}", "text": "it is big"} for i in range(3)]).encode()
    s = raw(port, b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
    time.sleep(0.3)
    s.close()
    time.sleep(2.5)
    assert requests.get(url + "/health", timeout=10).json()["batches"] == before  # no model call for it


def test_the_body_limit_holds_while_a_chunked_multipart_body_streams(rooted):
    _, port, _ = rooted  # --max-request-mb 1

    def chunk(b: bytes) -> bytes:
        return b"%x\r\n" % len(b) + b + b"\r\n"

    s = raw(port, b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                  b"Content-Type: multipart/form-data; boundary=XX\r\n\r\n" + chunk(
                      b'--XX\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n\r\n'))
    sent, answer = 0, b""
    with contextlib.closing(s):
        while sent < 32 << 20:
            if select.select([s], [], [], 0)[0]:
                break
            try:
                s.sendall(chunk(b"\0" * 65536))
            except OSError:
                break
            sent += 65536
        with contextlib.suppress(OSError):
            answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413"), (sent, answer[:200])
    assert sent < 8 << 20, sent  # answered while the body streamed, not after reading it all


def test_silent_sockets_time_out_and_never_stop_others_being_answered(rooted):
    url, port, _ = rooted  # --request-timeout 2, --max-connections 32
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(45)]
    idle += [raw(port, b"POST /predict HTTP/1.1\r\nHo") for _ in range(5)]  # headers begun, never finished
    started = time.monotonic()
    try:
        while True:
            with contextlib.suppress(requests.RequestException):
                r = requests.post(url + "/predict", json={"id": "n", "text": "it is big"}, timeout=5)
                if r.status_code == 200:
                    break
            assert time.monotonic() - started < 10, "no answer while 50 sockets sat idle"
            time.sleep(0.2)
        for s in idle:  # every silent socket was closed by the server
            assert s.recv(1) == b""
        assert time.monotonic() - started < 10
    finally:
        for s in idle:
            s.close()


def test_a_disconnect_mid_body_is_one_log_line(rooted):
    _, port, log = rooted
    s = raw(port, b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 5000\r\n\r\n[{\"id\": ")
    time.sleep(0.3)
    s.close()
    time.sleep(1.0)
    text = log.read_text()
    assert text.count("disconnected before sending its whole request") == 1, text[-3000:]
    assert "Traceback" not in text, text[-3000:]


def test_repeated_warnings_do_not_flood_stderr(rooted):
    url, _, log = rooted
    for i in range(12):
        r = requests.post(url + "/predict", json={"id": f"w{i}", "text": "it is big", "colour_x": "red"}, timeout=30)
        assert r.status_code == 200
    time.sleep(0.5)
    assert log.read_text().count("colour_x") == 1
