"""The embedded pretrained weights are the real ones (marked slow; they run in `make test`)."""

import shutil
import subprocess

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_minilm_paraphrase_similarity():
    from mmllm.modalities import load_encoder

    enc = load_encoder("text", "minilm")
    e = enc.embed(["A man is playing a guitar.", "Someone is playing the guitar.", "The stock market fell today."])
    assert enc.dim == 384 and enc.identity.startswith("minilm@53aa51172d14")
    assert float(e[0] @ e[1]) > 0.6
    assert float(e[0] @ e[2]) < 0.2


def test_efficientnet_classifies_a_real_cat():
    import torch
    from PIL import Image
    from skimage import data

    from mmllm.modalities import load_encoder

    enc = load_encoder("image", "efficientnet-lite0")
    with torch.inference_mode():
        probs = enc.model(enc.preprocess([Image.fromarray(data.chelsea())])).softmax(-1)[0]
    assert int(probs.argmax()) == 285  # ImageNet "Egyptian cat"
    assert float(probs[285]) > 0.3  # 0.38 with the centre crop (the cat is partly cropped)
    pooled, seq = enc.encode([Image.fromarray(data.chelsea())])
    assert pooled.shape == (1, 1280) and seq.shape == (1, 49, 1280)


def word_error_rate(ref: str, hyp: str) -> float:
    r, h = ref.lower().split(), hyp.lower().split()
    d = np.arange(len(h) + 1)
    for i, rw in enumerate(r, 1):
        prev, d[0] = d.copy(), i
        for j, hw in enumerate(h, 1):
            d[j] = min(prev[j] + 1, d[j - 1] + 1, prev[j - 1] + (rw != hw))
    return d[len(h)] / max(1, len(r))


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (apt-get install espeak-ng)")
def test_converted_whisper_transcribes_speech(tmp_path):
    import re

    import torch
    from transformers import PreTrainedTokenizerFast, WhisperFeatureExtractor, WhisperForConditionalGeneration

    from mmllm.encoders import resolve
    from mmllm.media import load_audio

    sentence = "the weather is nice today and we are going to the park"
    wav = tmp_path / "s.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(wav), sentence], check=True)
    folder, _ = resolve("whisper-tiny.en")
    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    feats = WhisperFeatureExtractor.from_pretrained(folder)(load_audio(wav, 16000), sampling_rate=16000,
                                                            return_tensors="pt").input_features
    ids = torch.tensor([[50257, 50362]])  # <|startoftranscript|> <|notimestamps|>
    with torch.inference_mode():
        enc = model.model.encoder(feats).last_hidden_state
        for _ in range(40):  # greedy decoding
            nxt = model(encoder_outputs=(enc,), decoder_input_ids=ids).logits[0, -1].argmax()
            if int(nxt) == 50256:
                break
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
    text = re.sub(r"[^a-z' ]", "", tok.decode(ids[0, 2:].tolist()).lower())
    assert word_error_rate(sentence, text) < 0.3, text


def test_whisper_real_length_is_as_useful():
    """Real-length encoding vs 30 s padding: nearly the same features (bench/ measures the speed-up)."""
    from mmllm.encoders import AudioEncoder

    rng = np.random.default_rng(0)
    clip = (0.1 * rng.standard_normal(16000)).astype(np.float32)
    a, _ = AudioEncoder("whisper-tiny.en").encode([clip])
    b, _ = AudioEncoder("whisper-tiny.en", whisper_full_window=True).encode([clip])
    cos = float(a[0] @ b[0] / np.linalg.norm(a[0]) / np.linalg.norm(b[0]))
    assert cos > 0.8


def test_smollm2_completes_a_prompt():
    import torch

    from mmllm.encoders import load_decoder

    model, tok, identity = load_decoder("smollm2-135m")
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
    assert identity.startswith("smollm2-135m@")
