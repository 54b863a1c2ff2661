"""One interface per role; each transformers family works through it (tiny random models saved locally)."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import sine
from mmllm.encoders import resolve
from mmllm.modalities import load_encoder


def save_image_model(kind: str, folder):
    from transformers import (CLIPVisionConfig, CLIPVisionModel, ConvNextConfig, ConvNextModel, Dinov2Config,
                              Dinov2Model, ResNetConfig, ResNetModel, SiglipVisionConfig, SiglipVisionModel,
                              ViTImageProcessor)

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                 patch_size=8)
    model = {"clip": lambda: CLIPVisionModel(CLIPVisionConfig(**small)),
             "siglip": lambda: SiglipVisionModel(SiglipVisionConfig(**small)),
             "dinov2": lambda: Dinov2Model(Dinov2Config(**{**small, "patch_size": 8})),
             "convnext": lambda: ConvNextModel(ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)),
             "resnet": lambda: ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                        layer_type="basic"))}[kind]()
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["clip", "siglip", "dinov2", "convnext", "resnet"])
def test_image_families(tmp_path, kind):
    folder = save_image_model(kind, tmp_path / kind)
    enc = load_encoder("image", str(folder))
    pooled, seq = enc.encode([Image.new("RGB", (50, 40), (255, 0, 0)), Image.new("RGB", (40, 40), (0, 0, 255))])
    assert pooled.shape == (2, enc.dim) and seq.shape[0] == 2 and seq.shape[2] == enc.dim
    assert not np.allclose(pooled[0], pooled[1])
    assert enc.identity.startswith(f"{kind}@") and len(enc.identity.split("@")[1]) == 12


def test_vit_and_identity_is_stable(tiny_models):
    a, b = load_encoder("image", str(tiny_models["image"])), load_encoder("image", str(tiny_models["image"]))
    assert a.identity == b.identity and a.describe()["preprocessing"]["image_size"] == 32


def save_audio_model(kind: str, folder):
    from transformers import (ASTConfig, ASTFeatureExtractor, ASTModel, HubertConfig, HubertModel,
                              Wav2Vec2FeatureExtractor)

    if kind == "hubert":
        HubertModel(HubertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4), num_feat_extract_layers=2,
                                 num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)).save_pretrained(folder)
        Wav2Vec2FeatureExtractor(sampling_rate=16000).save_pretrained(folder)
    else:
        ASTModel(ASTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           max_length=100, num_mel_bins=32, frequency_stride=10,
                           time_stride=10)).save_pretrained(folder)
        ASTFeatureExtractor(num_mel_bins=32, max_length=100).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["wav2vec2", "whisper", "hubert", "ast"])
def test_audio_families(tmp_path, tiny_models, kind):
    folder = tiny_models.get(kind) or save_audio_model(kind, tmp_path / kind)
    if kind == "wav2vec2":
        folder = tiny_models["audio"]
    enc = load_encoder("audio", str(folder))
    pooled, seqs = enc.encode([sine(0.5, 300), sine(1.3, 900)])
    assert pooled.shape == (2, enc.dim) and enc.sample_rate == 16000
    assert all(s.shape[1] == enc.dim for s in seqs)


def test_whisper_uses_real_length(tiny_models):
    enc = load_encoder("audio", str(tiny_models["whisper"]))
    _, seqs = enc.encode([sine(0.5), sine(2.2)])
    assert [len(s) for s in seqs] == [25, 110]  # 50 encoder frames per second of real audio, not 1500
    full = load_encoder("audio", str(tiny_models["whisper"]))
    full.whisper_full_window = True  # pad to Whisper's 30-s window: the same 25 real frames, other context
    _, seqs_full = full.encode([sine(0.5)])
    assert seqs_full[0].shape == seqs[0].shape == (25, enc.dim)
    assert not np.allclose(seqs_full[0], seqs[0], atol=1e-4)  # the window changes what the frames attend to
    _, again = enc.encode([sine(0.5)])
    np.testing.assert_array_equal(again[0], seqs[0])  # deterministic


@pytest.mark.parametrize("name,dim", [("logmel", 128), ("mfcc", 80)])
def test_librosa_front_ends(name, dim):
    enc = load_encoder("audio", name)
    pooled, _ = enc.encode([sine(0.5, 300), sine(0.5, 3000)])
    assert pooled.shape == (2, dim) and enc.identity == name and not np.allclose(pooled[0], pooled[1])


def test_text_encoder(tiny_models):
    enc = load_encoder("text", str(tiny_models["text"]))
    tok = enc.tokenize(["it is big", "small"], max_tokens=3)
    assert [len(x) for x in tok["input_ids"]] == [3, 3]
    emb = enc.embed(["it is big", "small"])
    assert emb.shape == (2, 32) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert isinstance(enc.build_model(), torch.nn.Module)


def test_unknown_and_offline_names(tmp_path):
    from mmllm.errors import UserError

    with pytest.raises(UserError, match="not a built-in alias"):
        resolve("org/some-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        resolve(str(tmp_path / "empty"))


@pytest.mark.parametrize("src_rate, rate, seconds", [(22050, 16000, 0.7), (44100, 16000, 1.3), (8000, 16000, 0.2),
                                                     (48000, 22050, 0.05)])
def test_resample_gives_librosas_samples(src_rate, rate, seconds):
    """media.resample calls soxr directly (librosa's first call costs ~2 s per process): the same samples."""
    import librosa

    from mmllm.media import resample

    x = np.random.default_rng(src_rate).normal(size=int(src_rate * seconds)).astype(np.float32)
    y = resample(x, src_rate, rate)
    want = librosa.resample(x, orig_sr=src_rate, target_sr=rate, res_type="soxr_hq")
    assert y.dtype == want.dtype == np.float32 and y.shape == want.shape
    np.testing.assert_array_equal(y, want)


def test_same_padding_convs_of_stride_1_become_plain_convs_with_the_same_outputs():
    from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding, Conv2dStaticSamePadding

    from mmllm.encoders import _fold_same_padding

    torch.manual_seed(0)
    net = torch.nn.Sequential(Conv2dDynamicSamePadding(4, 4, 3, groups=4), Conv2dStaticSamePadding(4, 8, 5,
                              image_size=17), Conv2dDynamicSamePadding(8, 8, 3, stride=2), torch.nn.ReLU(),
                              Conv2dDynamicSamePadding(8, 8, 1)).eval()
    x = torch.randn(2, 4, 17, 17)
    before = net(x)
    assert _fold_same_padding(net) == 3  # the strided conv pads (0, 1): it stays
    assert [type(m).__name__ for m in net] == ["Conv2d", "Conv2d", "Conv2dDynamicSamePadding", "ReLU", "Conv2d"]
    assert net[0].weight is not None and net[0].padding == (1, 1) and net[1].padding == (2, 2)
    torch.testing.assert_close(net(x), before, rtol=0, atol=1e-6)
    assert net(torch.randn(1, 4, 9, 12)).shape == (1, 8, 5, 6)  # any input size
