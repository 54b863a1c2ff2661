"""`mmllm serve`'s playground page (GET /) in a real headless browser (Debian's chromium driven by selenium through
its chromedriver: nothing is downloaded), and `/predict?reliance=1`, which the page shows."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from conftest import load_json_lines, run_cli
from test_conversations import chat_decoder  # noqa: F401 - the fixture
from test_serve import requests, start_serve

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
CHROMEDRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver")
                                                else None)
needs_browser = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="chromium and chromedriver not found "
                                   "(Debian: apt-get install chromium chromium-driver)")


@pytest.fixture
def checkpoint(prepared, tmp_path) -> Path:
    """A classifier over text, image and audio (the toy manifest's four labels)."""
    ck = tmp_path / "ck"
    r = run_cli("finetune", str(prepared), "--output", str(ck), "--fusion", "concat", "--epochs", "2",
                "--hidden-size", "16")
    assert r.exit_code == 0, r.output
    assert json.loads((ck / "config.json").read_text())["model"]["modalities"] == ["text", "image", "audio"]
    return ck


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1000,760",
                "--force-device-scale-factor=1"):
        options.add_argument(arg)
    # a fake microphone (chromium's test tone), allowed without a prompt: the page's recorder can be tested
    options.add_argument("--use-fake-device-for-media-stream")
    options.add_argument("--use-fake-ui-for-media-stream")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(driver, css: str, timeout: float = 60):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: d.find_elements(By.CSS_SELECTOR, css))


@needs_browser
def test_the_page_predicts_an_uploaded_image_and_audio_as_predict_does(checkpoint, prepared, browser, tmp_path):
    from selenium.webdriver.common.by import By

    media = prepared.parent / "media"
    image, audio, text = media / "img3.png", media / "a3.wav", "it is small"
    proc, url = start_serve(checkpoint)
    try:
        page = requests.get(url + "/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "unsafe" not in policy
        assert not re.search(r"https?://|(src|href)\s*=\s*[\"']|@import|url\(", page.text)  # no CDN: everything inline

        browser.get(url + "/")
        wait_for(browser, "body[data-ready='1']")
        assert "classification into 4 labels" in browser.find_element(By.ID, "info").text
        browser.find_element(By.ID, "text").send_keys(text)
        browser.find_element(By.ID, "image-file").send_keys(str(image))
        browser.find_element(By.ID, "audio-file").send_keys(str(audio))
        browser.find_element(By.ID, "predict").click()
        wait_for(browser, "body[data-done='1']")
        assert browser.find_element(By.ID, "error").text == ""
        shown = {
            "prediction": browser.find_element(By.ID, "prediction").text,
            "probability": browser.find_element(By.ID, "probability").text,
            "top_k": [(b.get_attribute("data-label"), float(b.get_attribute("data-probability")))
                      for b in browser.find_elements(By.CSS_SELECTOR, "#topk .bar")],
            "reliance": {r.get_attribute("data-modality"): [c.text for c in r.find_elements(By.TAG_NAME, "td")]
                         for r in browser.find_elements(By.CSS_SELECTOR, "#reliance tr")},
        }
        shots = Path(os.environ.get("MMLLM_PLAYGROUND_SCREENSHOT_DIR") or tmp_path)
        browser.save_screenshot(str(shots / "playground.png"))
        logs = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]

        # the same record, sent by another client
        with open(image, "rb") as fi, open(audio, "rb") as fa:
            expected = requests.post(url + "/predict?top_k=4&reliance=1", data={"id": "playground", "text": text},
                                     files={"image": (image.name, fi), "audio": (audio.name, fa)}).json()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert not [m for m in logs if "favicon" not in m], logs  # no script error, no Content-Security-Policy refusal
    assert "error" not in expected, expected
    assert shown["prediction"] == expected["prediction"]
    assert shown["probability"] == f"{100 * expected['probability']:.1f}%"
    assert shown["top_k"] == [(t["label"], t["probability"]) for t in expected["top_k"]]  # exact floats, in order
    assert list(shown["reliance"]) == ["none", "text", "image", "audio"]
    assert shown["reliance"]["none"][1] == expected["prediction"]
    for m in ("text", "image", "audio"):
        row, want = shown["reliance"][m], expected["reliance"][m]
        assert row[1:3] == [want["prediction"], f"{100 * want['probability']:.1f}%"], (m, row, want)


@needs_browser
def test_a_recording_from_the_microphone_is_sent_as_wav_and_predicted(checkpoint, browser):
    import base64
    import io

    import soundfile as sf
    from selenium.webdriver.common.by import By

    proc, url = start_serve(checkpoint)
    try:
        browser.get(url + "/")
        wait_for(browser, "body[data-ready='1']")
        record = browser.find_element(By.ID, "record")
        assert record.is_enabled()  # 127.0.0.1 is a secure context: MediaRecorder and getUserMedia are offered
        record.click()
        wait_for(browser, "#record-note:not(:empty)")
        time.sleep(1.5)
        record.click()  # stop: the browser decodes its recording and the page keeps it as 16-bit WAV
        wait_for(browser, "#audio-preview:not(.hidden)")
        wav = base64.b64decode(browser.execute_async_script(
            "const done = arguments[0]; const r = new FileReader();"
            "r.onload = () => done(r.result.split(',')[1]); r.readAsDataURL(state.audio.blob);"))
        browser.find_element(By.ID, "text").send_keys("it is big")
        browser.find_element(By.ID, "predict").click()
        wait_for(browser, "body[data-done='1']")
        assert browser.find_element(By.ID, "error").text == ""
        shown = browser.find_element(By.ID, "prediction").text
        expected = requests.post(url + "/predict?top_k=4&reliance=1", data={"id": "playground", "text": "it is big"},
                                 files={"audio": ("recording.wav", wav)}).json()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    samples, rate = sf.read(io.BytesIO(wav))
    assert samples.ndim == 1 and rate >= 8000 and len(samples) / rate > 0.5  # mono, about the time recorded
    assert abs(samples).max() > 0.01  # the fake microphone's tone, not silence
    assert shown == expected["prediction"]


def test_reliance_is_opt_in_and_masks_as_eval_model_does(checkpoint, toy_manifest):
    """/predict's answer is unchanged without ?reliance=1; with it, each record's answers with a modality masked,
    whose accuracy over the test split is eval model's reliance table."""
    import csv

    from mmllm.predict import Predictor
    from mmllm.records import raw_records

    predictor = Predictor(str(checkpoint))
    rows = list(csv.DictReader(open(toy_manifest)))
    records = list(raw_records(str(toy_manifest), predictor.config))
    assert len(records) == len(rows) and all(isinstance(r, dict) for r in records)
    plain = predictor.predict(records, top_k=2)
    with_reliance = predictor.predict(records, top_k=2, reliance=True)
    assert all("reliance" not in p for p in plain)
    assert [{k: v for k, v in p.items() if k != "reliance"} for p in with_reliance] == plain
    for p in with_reliance:
        assert set(p["reliance"]) == {"text", "image", "audio"}
        for r in p["reliance"].values():
            assert r["prediction"] in predictor.labels and 0 <= r["probability"] <= 1
            assert -1 <= r["drop"] <= 1
    r = run_cli("eval", "model", str(checkpoint), str(toy_manifest), "--split", "all")
    assert r.exit_code == 0, r.output
    masked = load_json_lines(r.stdout)[-1]["reliance"]["masked"]
    gold = [row["label"] for row in rows]
    for m in ("text", "image", "audio"):
        accuracy = sum(p["reliance"][m]["prediction"] == g for p, g in zip(with_reliance, gold)) / len(gold)
        assert accuracy == pytest.approx(masked[m]["accuracy"]), m


@pytest.fixture
def generator(prepared, chat_decoder, tmp_path) -> Path:  # noqa: F811
    ck = tmp_path / "gen"
    r = run_cli("finetune", str(prepared), "--output", str(ck), "--task", "generate", "--decoder", str(chat_decoder),
                "--epochs", "2", "--batch-size", "8", "--hidden-size", "32", "--prefix-tokens", "2", "--lr", "5e-3")
    assert r.exit_code == 0, r.output
    return ck


@needs_browser
def test_the_page_generates_through_the_chat_route_for_a_generation_checkpoint(generator, prepared, browser):
    import base64

    from selenium.webdriver.common.by import By

    media = prepared.parent / "media"
    image, audio, text = media / "img2.png", media / "a2.wav", "it is big"
    proc, url = start_serve(generator)
    try:
        browser.get(url + "/")
        wait_for(browser, "body[data-ready='1']")
        assert browser.find_element(By.ID, "info").text.startswith("generation")
        assert browser.find_element(By.ID, "predict").text == "Generate"
        browser.find_element(By.ID, "text").send_keys(text)
        browser.find_element(By.ID, "image-file").send_keys(str(image))
        browser.find_element(By.ID, "audio-file").send_keys(str(audio))
        browser.find_element(By.ID, "predict").click()
        wait_for(browser, "body[data-done='1']", timeout=120)
        assert browser.find_element(By.ID, "error").text == ""
        generated = browser.find_element(By.ID, "generated").text
        reliance = {r.get_attribute("data-modality"): r.find_elements(By.TAG_NAME, "td")[1].text
                    for r in browser.find_elements(By.CSS_SELECTOR, "#reliance tr")}
        logs = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        b64 = {p: base64.b64encode(p.read_bytes()).decode() for p in (image, audio)}
        chat = requests.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": [
            {"type": "text", "text": text},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64[image]}},
            {"type": "input_audio", "input_audio": {"data": b64[audio], "format": "wav"}}]}]}).json()
        with open(image, "rb") as fi, open(audio, "rb") as fa:
            expected = requests.post(url + "/predict?reliance=1", data={"id": "playground", "text": text},
                                     files={"image": (image.name, fi), "audio": (audio.name, fa)}).json()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert not [m for m in logs if "favicon" not in m], logs
    assert generated == chat["choices"][0]["message"]["content"].strip()  # the page shows the chat route's answer
    assert list(reliance) == ["none", "image", "audio"]  # the modality prefix; the text is the prompt
    assert reliance["none"] == expected["generated"].strip()
    for m in ("image", "audio"):
        assert reliance[m] == expected["reliance"][m]["generated"].strip(), m


def test_the_page_is_package_data_of_the_wheel(tmp_path):
    """pip-installed mmllm has the page: pyproject ships mmllm/playground.html (built from a copy of the sources)."""
    import subprocess
    import sys
    import zipfile

    from conftest import ROOT

    src = tmp_path / "src"
    shutil.copytree(ROOT / "mmllm", src / "mmllm", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("mmllm-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        assert z.read("mmllm/playground.html") == (ROOT / "mmllm" / "playground.html").read_bytes()
