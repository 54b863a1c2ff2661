"""--decoder a vision-language backbone (issue 23 §3): tiny random Idefics3 (SmolVLM's family), LLaVA and Qwen2-VL
models with their processors, built here, trained through prepare --keep-media / finetune / eval / predict / the API."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import (load_json_lines, make_tokenizer, one_line_error, run_cli, tiny_prepare_args, write_csv,
                            write_image)

# the SmolVLM / Idefics3 template: "User:<image>text<end_of_utterance>\nAssistant: answer<end_of_utterance>\n"
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
# LLaVA-1.5's: "USER: <image>\ntext ASSISTANT: answer</s>"
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'][0]['text'] }} "
    "{% elif message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['role'] != 'system' %}{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% if message['role'] == 'assistant' %}[SEP]{% else %} "
    "{% endif %}{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def _tokenizer(specials: list[str]):
    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.eos_token = "[SEP]"
    return tok


def build_idefics3(folder: Path) -> Path:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tok = _tokenizer(["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"])
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": 32},
                                                  max_image_size={"longest_edge": 32}),
        tokenizer=tok, image_seq_len=4, chat_template=IDEFICS3_TEMPLATE)
    config = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=len(tok),
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    Idefics3ForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_llava(folder: Path) -> Path:
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    tok = _tokenizer(["<image>"])
    processor = LlavaProcessor(image_processor=LlavaImageProcessorPil(size={"shortest_edge": 28},
                                                                      crop_size={"height": 28, "width": 28}),
                               tokenizer=tok, chat_template=LLAVA_TEMPLATE, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=28, patch_size=14),
        text_config=dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=len(tok),
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# Qwen2-VL's: "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>text<|im_end|>\n<|im_start|>assistant\n"
QWEN2VL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_qwen2vl(folder: Path) -> Path:
    """A tiny Qwen2-VL in the hub's layout (preprocessor_config.json naming Qwen2VLProcessor, chat_template.json):
    its processor also declares a video processor, which transformers cannot build without torchvision."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = _tokenizer(["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>",
                      "<|video_pad|>"])
    tok.eos_token = "<|im_end|>"
    ids = tok.convert_tokens_to_ids
    config = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.cls_token_id, pad_token_id=tok.pad_token_id, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 4]}),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 4, patch_size=14, merge_size=2,
                             temporal_patch_size=2).save_pretrained(folder)
    config = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**config, "processor_class": "Qwen2VLProcessor"}))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2VL_TEMPLATE}))
    return folder


FAMILIES = {"idefics3": build_idefics3, "llava": build_llava, "qwen2vl": build_qwen2vl}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def backbone(request, tmp_path_factory) -> Path:
    return FAMILIES[request.param](tmp_path_factory.mktemp("vlm") / request.param)


@pytest.fixture(scope="module")
def vlm_data(tmp_path_factory, tiny_models) -> Path:
    """40 pictures (red square / blue circle) described by their target; prepared with --keep-media."""
    root = tmp_path_factory.mktemp("vlmdata")
    rows = []
    for i in range(40):
        red = i % 2 == 0
        write_image(root / f"p{i}.png", (220, 20, 20) if red else (20, 20, 220), size=36 + i % 5)
        rows.append({"id": f"r{i}", "image": f"p{i}.png", "text": "what is it?",
                     "target": "a big red thing" if red else "a small blue thing",
                     "split": "train" if i < 28 else "validation" if i < 34 else "test"})
    write_csv(root / "m.csv", rows)
    out = root / "prepared"
    r = run_cli(*tiny_prepare_args(tiny_models, root / "m.csv", out), "--keep-media", "--no-transcribe")
    assert r.exit_code == 0, r.output
    assert "media kept: image_bytes" in r.output
    return out


def _tables(backbone: Path, vlm_data: Path):
    from mmllm.encoders import load_vision_language
    from mmllm.features import load_prepared
    from mmllm.tasks.generate import vlm

    ds, _ = load_prepared(vlm_data)
    model, processor, _ = load_vision_language(str(backbone))
    return ds, model, processor, vlm


def test_the_loss_covers_the_answer_and_the_picture_stands_at_its_placeholder(backbone, vlm_data):
    ds, model, processor, vlm = _tables(backbone, vlm_data)
    talk = {"messages": [{"role": "user", "content": "the big one <image> is it?"},
                         {"role": "assistant", "content": "a big red thing"},
                         {"role": "user", "content": "is it one thing?"},
                         {"role": "assistant", "content": "red"}], "system": None}
    columns = {"id": ["c0"], "text": [""], "target": ["red"], "conversation": [json.dumps(talk)],
               "has_image": [True], "image_bytes": [ds["train"][0]["image_bytes"]]}
    table = vlm.VisionTable(columns, processor, with_targets=True)
    batch = table.batch([0])
    tok = processor.tokenizer
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    runs, run = [], []
    for i, lab in zip(ids.tolist(), labels.tolist()):
        if lab != -100:
            run.append(i)
        elif run:
            runs.append(run)
            run = []
    if run:
        runs.append(run)
    answers = [tok.decode(r, skip_special_tokens=True).strip() for r in runs]
    assert answers == ["a big red thing", "red"]  # every assistant turn, nothing else
    image = getattr(processor, "image_token", None) or "<image>"  # the token the processor repeats per picture
    image_id = tok.convert_tokens_to_ids(image)
    text = tok.decode(ids)
    assert text.index("big one") < text.index(image) < text.index("is it")  # where the placeholder stood
    assert int((ids == image_id).sum()) >= 4 and bool((labels[ids == image_id] == -100).all())
    assert "pixel_values" in batch
    later = {"messages": [{"role": "user", "content": "it is"}, {"role": "assistant", "content": "red"},
                          {"role": "user", "content": "<image> is it one thing?"},
                          {"role": "assistant", "content": "a big red thing"}], "system": "the <image> is"}
    spans = vlm.VisionTable({**columns, "conversation": [json.dumps(later)]}, processor, with_targets=True)
    batch2 = spans.batch([0])  # the picture in a later turn: every prefix puts it there, as the whole does
    text2 = tok.decode(batch2["input_ids"][0])
    assert text2.index("red") < text2.index(image) < text2.index("one thing")
    follow_up = {"messages": talk["messages"][:3], "system": None}  # ends with a question: every turn is kept
    asked = vlm.VisionTable({**columns, "conversation": [json.dumps(follow_up)]}, processor, with_targets=False)
    prompt = tok.decode(asked.batch([0])["input_ids"][0])
    assert "big red thing" in prompt and prompt.index("big red thing") < prompt.index("one thing")
    answered = vlm.VisionTable(columns, processor, with_targets=False)  # ends with its answer: that one left out
    prompt = tok.decode(answered.batch([0])["input_ids"][0])
    assert "one thing" in prompt and prompt.rindex("red") < prompt.index("one thing")


def test_a_step_lowers_the_loss_and_save_load_generate_gives_the_same_tokens(backbone, vlm_data, tmp_path):
    from mmllm.tasks.generate import core

    ds, model, processor, vlm = _tables(backbone, vlm_data)
    cfg = core.GenConfig(modalities=["image"], dims={}, lora_r=4, decoder=str(backbone), decoder_identity="x",
                         prompt_format="chat", media_at="placeholder", decoder_kind=vlm.KIND, max_new_tokens=6)
    net = vlm.VisionLanguageDecoder(cfg, vlm.prepare_backbone(model, cfg), processor)
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("vision" in n for n in trainable)  # the vision tower stays frozen
    table = vlm.VisionTable(vlm._columns(ds["train"], "image"), processor, with_targets=True)
    batch = table.batch(range(8))
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)

    def loss() -> float:
        with torch.no_grad():
            return float(net(batch)["loss"])

    before = loss()
    for _ in range(5):
        opt.zero_grad()
        net(batch)["loss"].backward()
        opt.step()
    after = loss()
    assert after < before - 0.1, (before, after)
    net.eval()
    prompts = vlm.VisionTable(vlm._columns(ds["test"], "image"), processor, with_targets=False)

    def tokens(model, proc) -> torch.Tensor:  # six new tokens each, EOS or not: the same tokens, not just the text
        batch = model.table(vlm._columns(ds["test"], "image"), proc, False).batch(range(len(prompts)))
        with torch.no_grad():
            return model.decoder.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                          pad_token_id=proc.tokenizer.pad_token_id)

    said = tokens(net, processor)
    text = net.generate(prompts.batch(range(len(prompts))), processor, max_new_tokens=6)
    from mmllm.features import load_prepared

    core.save_checkpoint(net, tmp_path / "ck", processor, load_prepared(vlm_data)[1], {})
    from mmllm.tasks import get

    loaded, proc2 = get("generate").load(tmp_path / "ck", json.loads((tmp_path / "ck" / "config.json").read_text()),
                                         "cpu")
    assert torch.equal(tokens(loaded, proc2), said)
    assert loaded.generate(loaded.table(vlm._columns(ds["test"], "image"), proc2, False).batch(range(len(prompts))),
                           proc2, max_new_tokens=6) == text


def test_prepare_finetune_eval_predict_and_the_api_through_a_vision_language_decoder(backbone, vlm_data, tmp_path,
                                                                                      monkeypatch):
    import mmllm
    from mmllm import encoders

    ck = tmp_path / "ck"
    r = run_cli("finetune", vlm_data, "--output", ck, "--task", "generate", "--decoder", backbone, "--max-steps", "6",
                "--batch-size", "8", "--lr", "1e-2")
    assert r.exit_code == 0, r.output
    assert "is a vision-language model" in r.output and "LoRA rank 8 on its language model (the default)" in r.output
    config = json.loads((ck / "config.json").read_text())
    assert config["generation"]["decoder_kind"] == "vision-language" and config["generation"]["lora_r"] == 8
    assert json.loads((ck / "finetune_config.json").read_text())["lora_r"] == 8  # what ran, not the flag's 0
    assert {"processor_config.json", "preprocessor_config.json"} & {f.name for f in (ck / "decoder").iterdir()}
    card = (ck / "README.md").read_text()
    assert "encodes the images itself with its processor" in card
    r = run_cli("eval", "model", ck, vlm_data, "--split", "test")
    assert r.exit_code == 0, r.output
    result = load_json_lines(r.stdout)[-1]
    assert result["n"] == 6 and 0 <= result["chrf"] <= 100
    picture = vlm_data.parent / "p30.png"
    record = {"id": "q", "image": str(picture), "text": "what is it?"}
    r = run_cli("predict", ck, input=json.dumps(record) + "\n")
    assert r.exit_code == 0, r.output
    line = load_json_lines(r.stdout)[0]
    def unused(*a, **k):
        raise AssertionError("the frozen image encoder ran for a backbone that encodes the images itself")

    monkeypatch.setattr(encoders.ImageEncoder, "encode", unused)
    model = mmllm.load(ck, quiet=True)
    by_bytes = model.predict({"id": "q", "image": picture.read_bytes(), "text": "what is it?"})
    assert by_bytes["finish_reason"] in ("stop", "length")
    assert "generated" in line and by_bytes["generated"] == line["generated"]
    too_long = {**record, "id": "long", "text": "what is it? " * 1500}  # more tokens than the backbone reads
    r = run_cli("predict", ck, input="".join(json.dumps(x) + "\n" for x in (too_long, record)))
    assert r.exit_code == 1, r.output  # a record failed: said in the exit status, the others answered
    refused, answered = load_json_lines(r.stdout)
    assert refused["id"] == "long" and "generated" not in refused
    assert refused["error"].startswith("its prompt") and "reads at most 2048" in refused["error"]
    assert answered["generated"] == line["generated"]  # the other record is answered as alone


def test_resume_takes_back_the_lora_rank_the_interrupted_run_resolved(tmp_path):
    """finetune_config.json holds the resolved rank 8 of a vision-language --decoder; resuming with the flag left at
    its default is the same run, another explicit rank is refused."""
    from mmllm.config import FinetuneConfig, check_resume
    from mmllm.errors import UserError

    (tmp_path / "resume").mkdir()
    saved = dataclasses.asdict(FinetuneConfig(prepared="p", output=str(tmp_path), task="generate"))
    (tmp_path / "finetune_config.json").write_text(json.dumps({**saved, "lora_r": 8}))
    cfg = FinetuneConfig(prepared="p", output=str(tmp_path), task="generate", resume=True)
    assert check_resume(cfg) == {} and cfg.lora_r == 8
    with pytest.raises(UserError, match=r"lora_r \(8 -> 4\)"):
        check_resume(FinetuneConfig(prepared="p", output=str(tmp_path), task="generate", resume=True, lora_r=4))


def test_a_vision_language_decoder_needs_the_kept_media(backbone, tiny_models, vlm_data, tmp_path):
    rows = [{"id": f"r{i}", "image": f"p{i}.png", "target": "red", "split": "train" if i < 6 else "validation"}
            for i in range(8)]
    for i in range(8):
        write_image(tmp_path / f"p{i}.png")
    write_csv(tmp_path / "m.csv", rows)
    prepared = run_cli(*tiny_prepare_args(tiny_models, tmp_path / "m.csv", tmp_path / "p"), "--no-transcribe")
    assert prepared.exit_code == 0, prepared.output
    r = run_cli("finetune", tmp_path / "p", "--output", tmp_path / "ck", "--task", "generate", "--decoder", backbone)
    assert r.exit_code != 0
    assert "prepare it again with --keep-media" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "ck").exists()
    r = run_cli("prepare", vlm_data, tmp_path / "p", "--merge", "--output", tmp_path / "merged")
    assert "columns only in the first: image_bytes" in one_line_error(r)  # said, not two identical dicts


@pytest.mark.parametrize("option", [("--prefix-tokens", "8"), ("--hidden-size", "64"), ("--dropout", "0.3"),
                                    ("--decoder-precision", "fp32"), ("--media-tokens", "sequence")])
def test_options_a_vision_language_decoder_would_ignore_are_refused(backbone, vlm_data, tmp_path, option):
    r = run_cli("finetune", vlm_data, "--output", tmp_path / "ck", "--task", "generate", "--decoder", backbone,
                *option, "--max-steps", "1")
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert f"{option[0]} {option[1]}" in r.output and "does not use" in r.output
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("broken", ["template", "weights"])
def test_a_broken_backbone_folder_is_one_line_that_names_it(backbone, vlm_data, tmp_path, broken):
    folder = tmp_path / "bb"
    shutil.copytree(backbone, folder)
    if broken == "template":
        template = next(folder.glob("*.jinja"), None) or folder / "chat_template.jinja"
        template.write_text("{% for m in messages %}{{ m.content ")
    else:
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:5000])  # a download cut short
    r = run_cli("finetune", vlm_data, "--output", tmp_path / "ck", "--task", "generate", "--decoder", folder,
                "--max-steps", "1")
    assert r.exit_code == 2 and "Traceback" not in r.output
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(folder) in last
    assert ("chat template" if broken == "template" else "cannot load the vision-language decoder") in r.output
    assert not (tmp_path / "ck").exists()


def test_serve_answers_the_openai_client_as_predict_does(backbone, vlm_data, tmp_path, isolated_home):
    import base64

    openai = pytest.importorskip("openai")
    pytest.importorskip("requests")
    from tests.test_serve import start_serve

    ck = tmp_path / "ck"
    r = run_cli("finetune", vlm_data, "--output", ck, "--task", "generate", "--decoder", backbone, "--max-steps", "4",
                "--batch-size", "8", "--lr", "1e-2")
    assert r.exit_code == 0, r.output
    picture = base64.b64encode((vlm_data.parent / "p31.png").read_bytes()).decode()
    uri = f"data:image/png;base64,{picture}"
    talk = [{"role": "user", "content": [{"type": "text", "text": "is it red?"},
                                         {"type": "image_url", "image_url": {"url": uri}}]}]
    (tmp_path / "talk.jsonl").write_text(json.dumps({"id": "t", "messages": talk}) + "\n")
    r = run_cli("predict", ck, tmp_path / "talk.jsonl", "--max-new-tokens", "5")
    assert r.exit_code == 0, r.output
    want = load_json_lines(r.stdout)[0]["generated"]
    assert want  # the comparison below is not of empty answers
    proc, url = start_serve(ck, home=isolated_home)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        reply = client.chat.completions.create(model=ck.name, messages=talk, max_tokens=5, temperature=0)
        assert reply.choices[0].message.content == want
        stream = client.chat.completions.create(model=ck.name, messages=talk, max_tokens=5, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream) == want
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_records_without_the_kept_files_are_refused_not_answered_from_text(backbone, vlm_data):
    from mmllm.errors import UserError

    _, _, processor, vlm = _tables(backbone, vlm_data)
    with pytest.raises(UserError, match="--keep-media"):
        vlm.VisionTable({"id": ["a"], "text": ["it is"], "has_image": [True]}, processor, with_targets=False)


def test_a_record_longer_than_the_backbone_reads_is_refused_by_its_id(backbone, vlm_data, capsys):
    from mmllm.records import RecordError

    ds, _, processor, vlm = _tables(backbone, vlm_data)
    columns = vlm._columns(ds["train"].select(range(2)), "image")
    columns["text"] = ["what is it? " * 20, "what?"]
    fits = vlm.VisionTable(columns, processor, with_targets=True, context=10_000)
    longest = max(n for n, _ in fits.spans)
    short = vlm.VisionTable(columns, processor, with_targets=True, context=longest - 1)  # the long one left out
    assert f"1 record(s) longer than the {longest - 1} tokens" in capsys.readouterr().err
    assert short.ids == [columns["id"][1]] and short.spans == fits.spans[1:]
    assert short.picture(0) == columns["image_bytes"][1]  # its own picture, not the left-out record's
    assert short.batch([0])["labels"].ne(-100).any()
    asked = int(vlm.VisionTable(columns, processor, with_targets=False).batch([0])["attention_mask"].sum())
    prompts = vlm.VisionTable(columns, processor, with_targets=False, context=asked)  # no room for an answer
    prompts.batch([1])  # the short one is answered
    with pytest.raises(RecordError, match=f"is {asked + 1} tokens .* reads at most {asked}") as refused:
        prompts.batch([0, 1])
    assert refused.value.record_id == columns["id"][0]


def test_kept_files_are_read_from_the_prepared_split_a_batch_at_a_time(backbone, vlm_data):
    ds, _, processor, vlm = _tables(backbone, vlm_data)
    columns = vlm._columns(ds["train"], "image")
    assert not isinstance(columns["image_bytes"], list)  # not every file in memory at once
    table = vlm.VisionTable(columns, processor, with_targets=True)
    assert all(table.picture(i) == ds["train"][i]["image_bytes"] for i in range(len(table)))
    assert table.batch([0, 1])["pixel_values"].shape[0] >= 2
