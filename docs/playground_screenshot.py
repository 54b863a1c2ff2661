"""docs/playground.png: serve's playground page in headless chromium, on a checkpoint and one record (by hand).

    python docs/playground_screenshot.py CKPT IMAGE AUDIO "TEXT" docs/playground.png
"""

import subprocess
import sys
import time

import requests
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def main(ckpt: str, image: str, audio: str, text: str, out: str, port: int = 8765) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "mmllm", "serve", ckpt, "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1000,800",
                "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        for _ in range(600):
            try:
                if requests.get(url + "/health", timeout=1).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.2)
        driver.get(url + "/")
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "body[data-ready='1']"))
        driver.find_element(By.ID, "text").send_keys(text)
        driver.find_element(By.ID, "image-file").send_keys(image)
        driver.find_element(By.ID, "audio-file").send_keys(audio)
        driver.find_element(By.ID, "predict").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "body[data-done='1']"))
        driver.execute_script("window.scrollTo(0, 0)")
        time.sleep(0.5)  # the audio player reads the clip's length
        driver.save_screenshot(out)
    finally:
        driver.quit()
        proc.terminate()
        proc.wait()
    Image.open(out).convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(out, optimize=True)  # small PNG


if __name__ == "__main__":
    main(*sys.argv[1:6])
