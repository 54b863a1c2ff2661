"""`mmllm serve`: a real server on a free port, called with a real HTTP client."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import ROOT, one_line_error, run_cli

requests = pytest.importorskip("requests")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(prepared, tmp_path, isolated_home):
    ckpt = tmp_path / "ck"
    r = run_cli("finetune", str(prepared), "--output", str(ckpt), "--modalities", "text,image", "--epochs", "1",
                "--hidden-size", "16")
    assert r.exit_code == 0, r.output
    proc, url = start_serve(ckpt, "--batch-wait-ms", "50", "--max-batch", "64", "--media-root", str(prepared.parent),
                            home=isolated_home)
    yield url, ckpt, prepared.parent
    proc.terminate()
    proc.wait(timeout=20)


def test_health_info_and_predictions_match_cli_predict(server):
    url, ckpt, root = server
    assert requests.get(url + "/health").json()["status"] == "ok"
    info = requests.get(url + "/info").json()
    assert info["modalities"] == ["text", "image"]
    assert sorted(info["labels"]) == ["blue-big", "blue-small", "red-big", "red-small"]
    recs = [{"id": f"q{i}", "text": "it is big", "image": str(root / "media" / f"img{i}.png")} for i in range(4)]
    served = requests.post(url + "/predict?top_k=2", json=recs).json()
    assert isinstance(served, list), served
    cli = run_cli("predict", str(ckpt), "-", "--top-k", "2", input="".join(json.dumps(r) + "\n" for r in recs))
    expected = [json.loads(line) for line in cli.stdout.splitlines()]
    assert [s["id"] for s in served] == ["q0", "q1", "q2", "q3"]
    for s, e in zip(served, expected):
        assert s["prediction"] == e["prediction"]
        assert abs(s["probability"] - e["probability"]) < 1e-5
        assert [t["label"] for t in s["top_k"]] == [t["label"] for t in e["top_k"]]


def test_base64_and_multipart_give_the_same_answer_as_a_path(server):
    url, _, root = server
    img = root / "media" / "img3.png"
    by_path = requests.post(url + "/predict", json={"id": "a", "text": "it is small", "image": str(img)}).json()
    b64 = base64.b64encode(img.read_bytes()).decode()
    by_b64 = requests.post(url + "/predict", json={"id": "a", "text": "it is small", "image_base64": b64}).json()
    by_uri = requests.post(url + "/predict", json={"id": "a", "text": "it is small",
                                                   "image": "data:image/png;base64," + b64}).json()
    by_form = requests.post(url + "/predict", data={"id": "a", "text": "it is small"},
                            files={"image": ("x.png", img.read_bytes(), "image/png")}).json()
    for other in (by_b64, by_uri, by_form):
        assert other["prediction"] == by_path["prediction"]
        assert abs(other["probability"] - by_path["probability"]) < 1e-5


def test_bad_input_is_4xx_with_one_line_never_500(server):
    url, _, root = server
    r = requests.post(url + "/predict", data=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]
    r = requests.post(url + "/predict", json={"id": "q2"})  # none of the checkpoint's inputs
    assert r.status_code == 422 and r.json()["id"] == "q2" and "\n" not in r.json()["error"]
    r = requests.post(url + "/predict", json={"id": "m", "image": str(root / "missing.png")})
    assert r.status_code == 422 and "not found" in r.json()["error"]
    r = requests.post(url + "/predict", json={"id": "b", "image_base64": "%%%"})
    assert r.status_code == 422 and "base64" in r.json()["error"] and r.json()["id"] == "b"
    r = requests.post(url + "/predict", json=[{"id": "ok", "text": "it is big"}, 7])
    assert r.status_code == 200
    body = r.json()
    assert "prediction" in body[0] and "error" in body[1]
    r = requests.post(url + "/predict", json=42)
    assert r.status_code == 400
    for k in ("zero", "abc", "1e3", "-1", "0", "1001", "²"):
        r = requests.post(url + f"/predict?top_k={k}", json={"text": "x"})
        assert r.status_code == 400 and r.json() == {"error": "top_k: a whole number between 1 and 1000"}, (k, r.text)
    nested = "[" * 100_000 + "]" * 100_000
    r = requests.post(url + "/predict", data=nested, headers={"content-type": "application/json"})
    assert r.status_code == 400


def test_concurrent_requests_share_batches(server):
    url, _, _ = server

    def one(i: int) -> tuple[str, int]:
        r = requests.post(url + "/predict", json={"id": f"c{i}", "text": "it is big"})
        return r.json()["id"], int(r.headers["X-MMLLM-Batch-Records"])

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, range(32)))
    assert [g[0] for g in got] == [f"c{i}" for i in range(32)]  # each client gets its own answer
    assert max(g[1] for g in got) > 1  # at least one model call served several requests


def test_port_in_use_is_one_line_exit_2(prepared, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        ck = tmp_path / "ck"
        assert run_cli("finetune", str(prepared), "--output", str(ck), "--modalities", "image", "--epochs", "1",
                       "--hidden-size", "16").exit_code == 0
        r = run_cli("serve", str(ck), "--port", str(port))
    assert r.exit_code == 2 and "cannot listen" in r.stderr


def test_serve_of_a_missing_checkpoint_is_one_line_exit_2(tmp_path):
    r = run_cli("serve", str(tmp_path / "nope"))
    assert str(tmp_path / "nope") in one_line_error(r)


def start_serve(ckpt, *extra: str, home=None) -> tuple[subprocess.Popen, str]:
    """`mmllm serve CKPT` on a free port (models from `home` when given), answering /health; (process, base URL)."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if home is not None:
        env["MMLLM_HOME"] = str(home)
    proc = subprocess.Popen([sys.executable, "-m", "mmllm", "serve", str(ckpt), "--port", str(port), *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if requests.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            if proc.poll() is not None:
                pytest.fail(proc.stderr.read()[-2000:])
            time.sleep(0.2)
    proc.kill()
    pytest.fail("serve did not answer /health within 120 s")


@pytest.mark.parametrize("sig, code, name", [("SIGTERM", 143, "SIGTERM"), ("SIGINT", 130, "SIGINT (Ctrl-C)")])
def test_serve_says_when_it_stops_and_why(trained_checkpoint, sig, code, name):
    import signal

    proc, url = start_serve(trained_checkpoint)
    info = requests.get(url + "/info").json()
    assert info["transcribes_audio"] is False and info["transcriber"] is None  # a text-only checkpoint
    assert requests.post(url + "/predict", json={"id": "a", "text": "it is big"}).status_code == 200
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert f"serve: {name} received: finishing the open requests, then stopping" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"serve stopped: {name}, after ") and "1 record predicted in 1 model call" in last, err
    assert "Traceback" not in err


def test_serve_says_when_an_error_stops_it(trained_checkpoint, monkeypatch):
    import uvicorn

    def broken(self, sockets=None):
        raise RuntimeError("the event loop broke")

    monkeypatch.setattr(uvicorn.Server, "run", broken)
    r = run_cli("serve", str(trained_checkpoint), "--port", str(free_port()))
    assert r.exit_code == 1
    assert "serve stopped: error: RuntimeError: the event loop broke" in r.stderr and "Traceback" not in r.stderr


def test_port_in_use_names_the_cause(trained_checkpoint):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = run_cli("serve", str(trained_checkpoint), "--port", str(s.getsockname()[1]))
    assert r.exit_code == 2
    assert "cannot listen (Address already in use) (another server is listening there: choose another --port)" \
        in one_line_error(r)


def test_reliance_is_an_opt_in_query_option(server):
    url, _, root = server
    rec = {"id": "a", "text": "it is big", "image_base64": base64.b64encode(
        (root / "media" / "img0.png").read_bytes()).decode()}
    plain = requests.post(url + "/predict?top_k=2", json=rec).json()
    assert "reliance" not in plain  # the default answer is unchanged
    masked = requests.post(url + "/predict?top_k=2&reliance=1", json=rec).json()
    assert {k: v for k, v in masked.items() if k != "reliance"} == plain
    assert set(masked["reliance"]) == {"text", "image"}  # the checkpoint's modalities
    for r in masked["reliance"].values():
        assert set(r) == {"prediction", "probability", "drop"}
    bad = requests.post(url + "/predict?reliance=maybe", json=rec)
    assert bad.status_code == 400 and "reliance" in bad.json()["error"]
