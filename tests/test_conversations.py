"""Conversation data as the ecosystem writes it (LLaVA, ShareGPT / LLaMA-Factory, alpaca, OpenAI messages): read,
flattened, trained on with the loss on every assistant turn; each bad record is its own one-line error."""

import base64
import json
import shutil

import pytest

from conftest import run_cli, tiny_prepare_args, write_csv, write_image, write_wav

TEMPLATE = ("{% for m in messages %}[CLS] {{ m['role'] }} {{ m['content'] }} [SEP]{% endfor %}"
            "{% if add_generation_prompt %}[CLS] assistant{% endif %}")
COLORS = {"red": (200, 30, 30), "blue": (30, 30, 200)}


@pytest.fixture(scope="session")
def chat_decoder(tiny_decoder, tmp_path_factory):
    """The tiny GPT-2 with a chat template on its tokenizer ([CLS] opens a turn, [SEP] = EOS closes it)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("chat") / "gpt2"
    shutil.copytree(tiny_decoder, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)
    return folder


def media(tmp_path, n=12):
    (tmp_path / "m").mkdir(exist_ok=True)
    out = []
    for i in range(n):
        color = ["red", "blue"][i % 2]
        write_image(tmp_path / "m" / f"i{i}.png", COLORS[color])
        write_wav(tmp_path / "m" / f"a{i}.wav", freq=300 + 200 * (i % 2))
        out.append((f"m/i{i}.png", f"m/a{i}.wav", color, ["train"] * 8 + ["validation"] * 2 + ["test"] * 2))
    return out


def split(i):
    return "train" if i < 8 else "validation" if i < 10 else "test"


def llava(tmp_path):
    rows = [{"id": f"q{i}", "image": img, "split": split(i), "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": f"it is {color}"},
        {"from": "human", "value": "Is it big?"}, {"from": "gpt", "value": "yes it is big"}]}
        for i, (img, _, color, _) in enumerate(media(tmp_path))]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(rows, indent=1))  # one JSON array, as LLaVA ships it
    return path, "llava", 2


def sharegpt(tmp_path):
    rows = [{"id": f"s{i}", "split": split(i), "images": [img], "audios": [wav], "system": "answer briefly",
             "messages": [{"role": "user", "content": "<image><audio>what is it?"},
                          {"role": "assistant", "content": f"a {color} thing"}]}
            for i, (img, wav, color, _) in enumerate(media(tmp_path))]
    path = tmp_path / "sharegpt.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path, "sharegpt", 1


def alpaca(tmp_path):
    rows = [{"id": f"a{i}", "split": split(i), "instruction": "<image>name the colour", "input": "it is one thing",
             "output": f"{color}", "images": [img], "history": [["hello", "yes"]]}
            for i, (img, _, color, _) in enumerate(media(tmp_path))]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows))
    return path, "alpaca", 2


def openai_records(tmp_path):
    rows = []
    for i, (img, wav, color, _) in enumerate(media(tmp_path)):
        audio = base64.b64encode((tmp_path / wav).read_bytes()).decode()
        uri = "data:image/png;base64," + base64.b64encode((tmp_path / img).read_bytes()).decode()
        rows.append({"id": f"o{i}", "split": split(i), "messages": [
            {"role": "system", "content": "answer briefly"},
            {"role": "user", "content": [{"type": "text", "text": "what is it?"},
                                         {"type": "image_url", "image_url": {"url": uri if i % 2 else img}},
                                         {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}}]},
            {"role": "assistant", "content": f"a {color} thing"}]})
    path = tmp_path / "openai.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path, "openai", 1


@pytest.mark.parametrize("write", [llava, sharegpt, alpaca, openai_records])
def test_each_format_is_read_and_trained_on(write, tiny_models, chat_decoder, tmp_path):
    import datasets

    path, fmt, turns = write(tmp_path)
    r = run_cli(*tiny_prepare_args(tiny_models, path, tmp_path / "p"))
    assert r.exit_code == 0, r.output
    assert "conversations: 12 record(s) read as" in r.stderr and f"{turns * 12} assistant turn(s)" in r.stderr
    train = datasets.load_from_disk(str(tmp_path / "p"))["train"]
    assert len(train) == 8 and all(train["has_image"])
    talk = json.loads(train["conversation"][0])
    assert sum(m["role"] == "assistant" for m in talk["messages"]) == turns
    first = " ".join(m["content"] for m in talk["messages"] if m["role"] == "user")  # where they stood
    assert "<image>" in first and ("<audio>" in first) == (fmt in ("sharegpt", "openai"))
    assert not any("<image>" in m["content"] for m in talk["messages"] if m["role"] == "assistant")
    assert "<image>" not in train["text"][0]  # the text model reads the question without them
    assert train["target"][0] == talk["messages"][-1]["content"]
    if fmt in ("sharegpt", "openai"):
        assert talk["system"] == "answer briefly" and all(train["has_audio"])
    r = run_cli("finetune", str(tmp_path / "p"), "--output", str(tmp_path / "g"), "--task", "generate", "--decoder",
                str(chat_decoder), "--epochs", "3", "--batch-size", "4", "--hidden-size", "16", "--prefix-tokens",
                "2", "--lr", "5e-3", "--patience", "0")
    assert r.exit_code == 0, r.output
    assert "prompts: the decoder tokenizer chat template" in r.stderr
    assert "media placeholders: 8 of 8 training records put their media where their placeholder stands" in r.stderr
    assert json.loads((tmp_path / "g" / "config.json").read_text())["generation"]["media_at"] == "placeholder"
    losses = [json.loads(x)["val_loss"] for x in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()
              if "val_loss" in x]
    assert losses[-1] < losses[0]
    r = run_cli("predict", str(tmp_path / "g"), str(path))
    assert r.exit_code == 0, r.output
    assert all("generated" in json.loads(x) for x in r.stdout.splitlines())


def test_loss_covers_every_assistant_turn_and_nothing_else(chat_decoder, tiny_decoder):
    from transformers import AutoTokenizer

    from mmllm import chat

    talk = [{"role": "user", "content": "is it big"}, {"role": "assistant", "content": "red thing"},
            {"role": "user", "content": "and"}, {"role": "assistant", "content": "small"}]
    tok = AutoTokenizer.from_pretrained(chat_decoder)
    ids, mask = chat.encode(tok, talk, "be brief", chat.CHAT)
    assert ids == tok(tok.apply_chat_template([{"role": "system", "content": "be brief"}, *talk], tokenize=False),
                      add_special_tokens=False)["input_ids"]
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "red thing [SEP] small [SEP]"
    assert tok.decode(chat.prompt_ids(tok, talk, None, chat.CHAT)) == tok.decode(
        tok(tok.apply_chat_template(talk[:3], tokenize=False, add_generation_prompt=True),
            add_special_tokens=False)["input_ids"])
    plain = AutoTokenizer.from_pretrained(tiny_decoder)  # no template: User:/Assistant: turns, EOS after each answer
    ids, mask = chat.encode(plain, talk, None, chat.PLAIN)
    assert plain.decode([i for i, m in zip(ids, mask) if m]) == "red thing [SEP] small [SEP]"


def test_the_embedded_decoders_template_marks_its_turns():
    """smollm2-135m (SmolLM2-135M-Instruct) has a chat template; its answers end with <|im_end|>, its EOS."""
    from pathlib import Path

    from conftest import REAL_HOME

    folder = Path(REAL_HOME) / "models" / "smollm2-135m"
    if not (folder / "tokenizer.json").is_file():
        pytest.skip("smollm2-135m not pulled")
    from transformers import AutoTokenizer

    from mmllm import chat

    tok = AutoTokenizer.from_pretrained(folder)
    assert chat.template_kind(tok) == chat.CHAT
    talk = [{"role": "user", "content": "what is it?"}, {"role": "assistant", "content": "a red square."}]
    ids, mask = chat.encode(tok, talk, None, chat.CHAT)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "a red square.<|im_end|>"
    assert ids[-1] != tok.eos_token_id and tok.eos_token_id in [i for i, m in zip(ids, mask) if m]
    assert chat.stop_ids(tok, None, chat.CHAT) == [tok.eos_token_id]


BAD = {
    "placeholders": {"images": ["m/i0.png"], "messages": [{"role": "user", "content": "<image><image> what"},
                                                          {"role": "assistant", "content": "red"}]},
    "missing file": {"images": ["m/nope.png"], "messages": [{"role": "user", "content": "<image> what"},
                                                            {"role": "assistant", "content": "red"}]},
    "empty answer": {"messages": [{"role": "user", "content": "what"}, {"role": "assistant", "content": "  "}]},
    "url": {"messages": [{"role": "user", "content": [{"type": "image_url",
                                                       "image_url": {"url": "https://example.com/a.png"}}]},
                         {"role": "assistant", "content": "red"}]},
    "picture in an answer": {"messages": [{"role": "user", "content": "what"}, {"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": "m/i0.png"}}]}]},
}


def test_each_bad_record_is_its_own_one_line_error(tiny_models, tmp_path):
    good = sharegpt(tmp_path)[0].read_text().splitlines()
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(good + [json.dumps(b) for b in BAD.values()]) + "\n")
    r = run_cli(*tiny_prepare_args(tiny_models, path, tmp_path / "p"))
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "p" / "mmllm-prepared.json").read_text())
    reasons = {e["row"]: e for e in meta["skipped"]}
    assert sorted(reasons) == [13, 14, 15, 16, 17]
    assert "2 <image> placeholder(s) in the turns but 1 image item(s) in 'images'" in reasons[13]["reason"]
    assert reasons[14]["column"] == "image" and "nope.png" in json.dumps(reasons[14])
    assert reasons[15]["reason"] == "turn 2: empty assistant turn"
    assert "https URLs are not fetched" in reasons[16]["reason"]
    assert reasons[17]["reason"].startswith("turn 2: an assistant turn is text only")
    assert all("\n" not in e["reason"] for e in meta["skipped"])


def test_sharegpt_videos_list_fills_the_video_input(tiny_models, chat_decoder, tmp_path):
    """LLaMA-Factory's `videos` list with one `<video>` placeholder per item: the clip is the record's video (its
    frames encoded, its soundtrack the audio), and a generation model trains on it; two videos are one line."""
    import datasets

    from test_video import video_args, write_video

    (tmp_path / "v").mkdir()
    rows = []
    for i in range(12):
        color = ["red", "blue"][i % 2]
        write_video(tmp_path / "v" / f"c{i}.mp4", colors=[COLORS[color]] * 6, tone=440.0 if i % 2 else None)
        rows.append({"id": f"v{i}", "split": split(i), "videos": [f"v/c{i}.mp4"],
                     "messages": [{"role": "user", "content": "<video>what colour is the clip?"},
                                  {"role": "assistant", "content": f"it is {color}"}]})
    rows.append({"id": "two", "split": "train", "videos": ["v/c0.mp4", "v/c1.mp4"],
                 "messages": [{"role": "user", "content": "<video><video>which?"},
                              {"role": "assistant", "content": "both"}]})
    path = tmp_path / "videos.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run_cli(*video_args(tiny_models, path, tmp_path / "p"))
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "p" / "mmllm-prepared.json").read_text())
    assert [(e["id"], e["column"]) for e in meta["skipped"]] == [("two", "videos")]
    assert "2 videos: a record carries at most one video" in meta["skipped"][0]["reason"]
    train = datasets.load_from_disk(str(tmp_path / "p"))["train"]
    assert len(train) == 8 and all(train["has_video"])
    assert [bool(x) for x in train["has_audio"]] == [i % 2 == 1 for i in range(8)]  # the soundtracks
    r = run_cli("finetune", str(tmp_path / "p"), "--output", str(tmp_path / "g"), "--task", "generate", "--decoder",
                str(chat_decoder), "--epochs", "2", "--batch-size", "4", "--hidden-size", "16", "--prefix-tokens",
                "2", "--max-new-tokens", "4")
    assert r.exit_code == 0, r.output
    assert "video" in json.loads((tmp_path / "g" / "config.json").read_text())["generation"]["modalities"]


def test_each_medium_stands_where_its_placeholder_stands(chat_decoder):
    """A placeholder is one marked position in the rendered template; embed puts that medium's projected tokens
    there (the record's other media before the prompt), never in the loss; the loss equals the decoder's own
    loss over the same embeddings; a record without placeholders keeps the prefix layout."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from mmllm.encoders import load_decoder
    from mmllm.tasks.generate import GenConfig, GenTable, PrefixDecoder, prepare_decoder

    decoder, tok, _ = load_decoder(str(chat_decoder))
    cfg = GenConfig(modalities=["image", "audio"], dims={"image": 6, "audio": 5}, prefix_tokens=2, hidden_size=8,
                    decoder=str(chat_decoder), prompt_format="chat", media_at="placeholder")
    assert cfg.slots() == {"<image>": -1, "<audio>": -2}
    torch.manual_seed(0)
    model = PrefixDecoder(cfg, prepare_decoder(decoder, cfg)).eval()
    talks = [json.dumps({"system": None, "messages": [{"role": "user", "content": "look <image> what is it?"},
                                                       {"role": "assistant", "content": "a red thing"}]}), None]
    cols = {"id": ["a", "b"], "text": ["look what is it?", "plain question"], "target": ["a red thing", "blue"],
            "conversation": talks, "has_image": [True, True], "has_audio": [True, False],
            "image_emb": np.random.randn(2, 6).astype(np.float32),
            "audio_emb": np.random.randn(2, 5).astype(np.float32)}
    table = GenTable(cols, ["image", "audio"], tok, with_targets=True, kind="chat", slots=cfg.slots())
    ids = table.answers[0][0]
    assert ids.count(-1) == 1 and -2 not in ids and all(i >= 0 for i in table.answers[1][0])
    k = ids.index(-1)
    tokenizer = AutoTokenizer.from_pretrained(chat_decoder)
    rendered = tokenizer.apply_chat_template(json.loads(talks[0])["messages"], tokenize=False)
    before, after = rendered.split("<image>")  # the template's text on either side of the placeholder
    assert ids[:k] == tokenizer(before, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids[k + 1:]) == tokenizer.decode(tokenizer(after, add_special_tokens=False)["input_ids"])
    batch = table.batch(range(2))
    with torch.no_grad():
        inputs, mask, labels = model.embed(batch)
        image, audio = model.media(batch)  # (B, 2, d) each
        words = model.decoder.get_input_embeddings()(batch["input_ids"].clamp(min=0))
        # record a: audio (no placeholder) first, then the tokens with the image where <image> stood
        assert torch.equal(inputs[0, :2], audio[0]) and torch.equal(inputs[0, 2:2 + k], words[0, :k])
        assert torch.equal(inputs[0, 2 + k:4 + k], image[0])
        assert torch.equal(inputs[0, 4 + k:3 + len(ids)], words[0, k + 1:len(ids)])
        assert (labels[0, :4 + k] == -100).all() and int(mask[0].sum()) == len(ids) - 1 + 4
        # record b: both media before its tokens, as before placeholders
        assert torch.equal(inputs[1, :2], image[1]) and torch.equal(inputs[1, 4:4 + len(table.answers[1][0])],
                                                                    words[1, :len(table.answers[1][0])])
        reference = model.decoder(inputs_embeds=inputs, attention_mask=mask, labels=labels).loss
        assert float(model(batch)["loss"]) == pytest.approx(float(reference), rel=1e-5)
        got = model.generate(table.batch(range(2), with_targets=False), tokenizer, max_new_tokens=3)
    assert len(got) == 2 and all(isinstance(g, str) for g in got)


def test_a_flat_record_with_two_placeholders_of_its_one_medium_is_its_own_error(tmp_path):
    from mmllm.records import read_records

    write_image(tmp_path / "a.png")
    path = write_csv(tmp_path / "m.csv", [{"id": "two", "image": "a.png", "text": "<image> this or <image>?",
                                           "target": "red"},
                                          {"id": "one", "image": "a.png", "text": "<image> this?", "target": "red"}])
    records, errors, _ = read_records(str(path), {})
    assert [r["id"] for r in records] == ["one"]
    assert errors[0]["id"] == "two" and errors[0]["column"] == "text"
    reason = errors[0]["reason"]
    assert reason.startswith("2 <image> placeholders in the text") and "'images' list" in reason


def test_the_skip_table_groups_a_conversations_problem_not_its_turn():
    from mmllm.preparation import reason_kind

    assert reason_kind("turn 2: an assistant turn is text only (image_url ...)") == \
        "an assistant turn is text only (image_url ...)"
    assert reason_kind("turn 4: empty assistant turn") == reason_kind("turn 2: empty assistant turn")
    assert reason_kind("cannot decode (truncated): a.png") == "cannot decode (truncated)"


def test_a_conversation_records_other_keys_are_carried_and_a_clash_with_its_turns_is_its_error(tmp_path):
    """A label or the user's own columns beside the turns reach the flat record (a label trains a classifier, a
    custom id column names the record); a key the turns also give (an `image` beside `images`, a `text`) is that
    record's one-line error, never dropped in silence."""
    from mmllm.records import read_records

    write_image(tmp_path / "a.png")
    turns = [{"role": "user", "content": "<image>what is it?"}, {"role": "assistant", "content": "a red thing"}]
    rows = [{"key": "k1", "label": "red", "images": ["a.png"], "messages": turns},
            {"key": "k2", "label": "blue", "images": ["a.png"], "messages": turns, "image": "a.png"},
            {"key": "k3", "label": "red", "images": ["a.png"], "messages": turns, "text": "another question"},
            {"key": "k4", "images": ["a.png"], "messages": turns, "conversations": turns},
            {"key": "k5", "label": "red", "instruction": "name it", "output": "red", "text": None}]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    records, errors, cols = read_records(str(path), {"id": "key"})
    assert [(r["id"], r["label"]) for r in records] == [("k1", "red"), ("k5", "red")]
    assert records[0]["text"] == "what is it?" and records[0]["target"] == "a red thing"
    assert cols["label"] == "label"
    by_row = {e["row"]: e for e in errors}
    assert sorted(by_row) == [2, 3, 4]
    assert by_row[2]["column"] == "image" and "give it in 'images', with a <image> placeholder" in by_row[2]["reason"]
    assert by_row[3]["column"] == "text" and "which give the record's text" in by_row[3]["reason"]
    assert "both 'messages' and 'conversations'" in by_row[4]["reason"]
