"""serve's OpenAI-compatible routes, called with the official `openai` client: the same answer as `mmllm predict`
for the same conversation, streamed and not."""

from __future__ import annotations

import base64
import json

import pytest

from conftest import run_cli
from test_conversations import chat_decoder  # noqa: F401 - the fixture
from test_serve import start_serve

openai = pytest.importorskip("openai")
requests = pytest.importorskip("requests")


@pytest.fixture
def chat_server(prepared, chat_decoder, tmp_path, isolated_home):  # noqa: F811
    ckpt = tmp_path / "gen"
    r = run_cli("finetune", str(prepared), "--output", str(ckpt), "--task", "generate", "--decoder", str(chat_decoder),
                "--epochs", "4", "--batch-size", "8", "--hidden-size", "32", "--prefix-tokens", "2", "--lr", "5e-3")
    assert r.exit_code == 0, r.output
    proc, url = start_serve(ckpt, "--batch-wait-ms", "50", "--media-root", str(tmp_path), home=isolated_home)
    yield url, ckpt, tmp_path
    proc.terminate()
    proc.wait(timeout=20)


def conversation(root, i: int) -> list[dict]:
    image = base64.b64encode((root / "media" / f"img{i}.png").read_bytes()).decode()
    audio = base64.b64encode((root / "media" / f"a{i}.wav").read_bytes()).decode()
    return [{"role": "user", "content": [
        {"type": "text", "text": "it is big"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
        {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}}]}]


def test_the_openai_client_gets_what_predict_gives(chat_server, tmp_path):
    url, ckpt, root = chat_server
    talks = [conversation(root, i) for i in range(3)]
    talks.append([{"role": "user", "content": [{"type": "text", "text": "it is small"},
                                               {"type": "image_url", "image_url": {"url": "media/img1.png"}}]}])
    (tmp_path / "talks.jsonl").write_text("\n".join(json.dumps({"id": n, "messages": m})
                                                    for n, m in enumerate(talks)) + "\n")
    r = run_cli("predict", str(ckpt), str(tmp_path / "talks.jsonl"), "--max-new-tokens", "6")
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    expected, reasons = [x["generated"] for x in lines], [x["finish_reason"] for x in lines]
    assert any(expected), expected  # something was generated: the comparison below is not of empty strings

    before = requests.get(url + "/health").json()
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    [model] = client.models.list().data
    assert model.id == ckpt.name
    for talk, want, why in zip(talks, expected, reasons):
        reply = client.chat.completions.create(model=model.id, messages=talk, max_tokens=6, temperature=0)
        assert reply.choices[0].message.content == want and reply.choices[0].message.role == "assistant"
        assert reply.choices[0].finish_reason == why and why in ("stop", "length")
        stream = client.chat.completions.create(model=model.id, messages=talk, max_tokens=6, stream=True)
        parts = [c.choices[0].delta.content or "" for c in stream]
        assert "".join(parts) == want
    after = requests.get(url + "/health").json()  # the chat route's records are counted, in all and by route
    chat = [after["routes"]["chat_completions"]["records"] - before["routes"]["chat_completions"]["records"]]
    assert chat == [2 * len(talks)] and after["records"] - before["records"] == 2 * len(talks)
    assert after["routes"]["predict"] == before["routes"]["predict"]
    # one token each: an answer with any text was cut by the limit (an end token decodes to nothing)
    r = run_cli("predict", str(ckpt), str(tmp_path / "talks.jsonl"), "--max-new-tokens", "1")
    short = [json.loads(x) for x in r.stdout.splitlines()]
    assert any(x["generated"] for x in short)
    assert all(x["finish_reason"] == "length" for x in short if x["generated"])
    reply = client.chat.completions.create(model=model.id, messages=talks[0], max_tokens=1)
    assert reply.choices[0].finish_reason == short[0]["finish_reason"]

    # a stop string cuts the answer as predict's --stop does
    word = next(w for w in " ".join(expected).split())
    n = next(i for i, e in enumerate(expected) if word in e)
    r = run_cli("predict", str(ckpt), str(tmp_path / "talks.jsonl"), "--max-new-tokens", "6", "--stop", word)
    cut = [json.loads(x)["generated"] for x in r.stdout.splitlines()][n]
    reply = client.chat.completions.create(model=model.id, messages=talks[n], max_tokens=6, stop=[word])
    assert reply.choices[0].message.content == cut and word not in cut


def test_refusals_are_openai_errors(chat_server):
    url, ckpt, root = chat_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    talk = conversation(root, 0)
    with pytest.raises(openai.BadRequestError, match="only 1"):
        client.chat.completions.create(model="m", messages=talk, n=2)
    with pytest.raises(openai.BadRequestError, match="outside --media-root"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "../../etc/passwd"}}]}])
    with pytest.raises(openai.BadRequestError, match="not fetched"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}])
    r = requests.post(url + "/v1/chat/completions", json={"messages": talk}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403  # the same guard as every route
    r = requests.post(url + "/v1/chat/completions", data="x" * 10, headers={"content-type": "text/plain"})
    assert r.status_code == 415
