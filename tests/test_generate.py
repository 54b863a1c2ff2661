"""--task generate with a tiny random decoder: training, BLEU in eval, streaming predict (fast path)."""

import json

import pytest

from conftest import load_json_lines, run_cli, write_csv, write_wav


def gen_finetune(prepared, decoder, out, *extra):
    r = run_cli("finetune", str(prepared), "--output", str(out), "--task", "generate", "--decoder", str(decoder),
                "--epochs", "3", "--batch-size", "8", "--hidden-size", "32", "--prefix-tokens", "2", "--lr", "5e-3",
                "--max-new-tokens", "8", *extra)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_generation_trains_and_loss_falls(prepared, tiny_decoder, tmp_path):
    out = tmp_path / "gen"
    summary = gen_finetune(prepared, tiny_decoder, out, "--epochs", "4")
    epochs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in x]
    assert epochs[-1]["val_loss"] < epochs[0]["val_loss"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["task"] == "generate" and cfg["generation"]["modalities"] == ["image", "audio"]
    assert (out / "decoder" / "config.json").is_file()
    from safetensors.torch import load_file

    keys = load_file(str(out / "model.safetensors")).keys()
    assert keys and not any(k.startswith("decoder.") for k in keys)  # frozen decoder: referenced, not copied
    assert summary["steps"] > 0


def test_eval_model_reports_a_generator_that_collapsed(prepared, tiny_decoder, tmp_path, monkeypatch):
    """A generator that writes the same answer for every record (the emoji defaults wrote "frog" for most unseen
    pictures): eval's result has "collapsed" with that answer, and stderr one warning line."""
    from mmllm.tasks.generate.core import PrefixDecoder

    out = tmp_path / "gen"
    gen_finetune(prepared, tiny_decoder, out)
    real = PrefixDecoder.generate
    monkeypatch.setattr(PrefixDecoder, "generate", lambda self, *a, **k: ["frog"] * len(real(self, *a, **k)))
    r = run_cli("eval", "model", str(out), str(prepared), "--split", "train", "--max-new-tokens", "4")
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert m["collapsed"]["answer"] == "frog" and m["collapsed"]["count"] == m["n"] >= 10
    assert m["collapsed"]["reference_share"] == 0.0 and m["bleu"] == 0.0
    assert sum("warning:" in line and "'frog'" in line for line in r.stderr.splitlines()) == 1


def test_generation_eval_and_predict(prepared, tiny_decoder, toy_manifest, tmp_path):
    out = tmp_path / "gen"
    gen_finetune(prepared, tiny_decoder, out, "--monitor", "val_bleu", "--l2", "1e-4")
    r = run_cli("eval", "model", str(out), str(prepared), "--max-new-tokens", "8")
    assert r.exit_code == 0, r.output
    assert "reliance" not in json.loads(r.stdout) and "reliance: not computed" in r.stderr  # opt-in here
    r = run_cli("eval", "model", str(out), str(prepared), "--max-new-tokens", "8", "--reliance")
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert m["task"] == "generate" and "tok:13a" in m["bleu_signature"]
    assert set(m["reliance"]["masked"]) == {"none", "image", "audio"} and len(m["examples"]) == min(5, m["n"])
    # eval's BLEU is sacreBLEU's corpus BLEU of the greedy outputs that predict gives for the same test records
    import datasets
    import sacrebleu

    test = datasets.load_from_disk(str(prepared))["test"]
    r = run_cli("predict", str(out), str(toy_manifest), "--max-new-tokens", "8")
    assert r.exit_code == 0, r.output
    greedy = {x["id"]: x["generated"] for x in load_json_lines(r.stdout)}
    hyps = [greedy[i] for i in test["id"]]
    assert [e["generated"] for e in m["examples"]] == hyps[:len(m["examples"])]
    assert m["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [list(test["target"])]).score, abs=1e-9)
    r = run_cli("predict", str(out), str(toy_manifest), "--max-new-tokens", "5", "--num-beams", "2")
    assert r.exit_code == 0, r.output
    lines = load_json_lines(r.stdout)
    assert len(lines) == 48 and all(isinstance(x["generated"], str) for x in lines)
    assert [x["id"] for x in lines] == [f"r{i}" for i in range(48)]
    short = {"id": "short", "text": "red"}
    too_long = {"id": "long", "text": "red cat " * 70}  # more than the decoder's 128 positions: refused, not cut
    r = run_cli("predict", str(out), "--max-new-tokens", "5", input="".join(json.dumps(x) + "\n"
                                                                               for x in (too_long, short)))
    assert r.exit_code == 1, r.output  # a record failed, the other is answered
    refused, answered = load_json_lines(r.stdout)
    assert refused["id"] == "long" and "generated" not in refused, refused
    room = 128 - 2 * 2 - 1  # the tiny GPT-2's positions less two media of 2 prefix tokens and one answer token
    assert refused["error"].startswith("its prompt is") and f"at most {room}:" in refused["error"], refused
    assert isinstance(answered["generated"], str)


def test_sampling_options(prepared, tiny_decoder, toy_manifest, tmp_path):
    """--do-sample with --temperature/--top-p: reproducible under one seed, different from greedy decoding."""
    import torch

    out = tmp_path / "gen"
    gen_finetune(prepared, tiny_decoder, out, "--epochs", "1")

    def predict(*extra, seed=0):
        torch.manual_seed(seed)  # sampling draws from torch's generator
        r = run_cli("predict", str(out), str(toy_manifest), "--max-new-tokens", "6", *extra)
        assert r.exit_code == 0, r.output
        return [x["generated"] for x in load_json_lines(r.stdout)]

    sample = ("--do-sample", "--temperature", "1.5", "--top-p", "0.95")
    greedy, first, second = predict(), predict(*sample), predict(*sample)
    assert first == second
    assert first != greedy and first != predict(*sample, seed=1)
    assert predict(seed=1) == greedy  # greedy decoding ignores the generator
    narrow = predict("--do-sample", "--temperature", "1.5", "--top-p", "1e-6")  # only the most likely token
    assert narrow == greedy


@pytest.mark.parametrize("extra", [["--lora-r", "2"], ["--train-decoder"]])
def test_generation_trainable_decoder_round_trip(prepared, tiny_decoder, tmp_path, extra):
    out = tmp_path / "gen"
    gen_finetune(prepared, tiny_decoder, out, "--epochs", "1", *extra)
    from safetensors.torch import load_file

    assert not any(k.startswith("decoder.") for k in load_file(str(out / "model.safetensors")))
    decoder = load_file(str(out / "decoder" / "model.safetensors"))  # the trained decoder: a Hugging Face folder
    original = load_file(str(tiny_decoder / "model.safetensors"))
    assert decoder.keys() == original.keys() and any(not decoder[k].equal(v) for k, v in original.items())
    r = run_cli("eval", "model", str(out), str(prepared), "--max-new-tokens", "4", "--no-reliance")
    assert r.exit_code == 0, r.output


def test_generation_needs_targets(tiny_models, tiny_decoder, tmp_path):
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps({"id": i, "text": "big", "label": "a"}) for i in range(10)))
    r = run_cli("prepare", str(tmp_path / "m.jsonl"), "--output", str(tmp_path / "p"), "--text-model",
                str(tiny_models["text"]))
    assert r.exit_code == 0, r.output
    r = run_cli("finetune", str(tmp_path / "p"), "--output", str(tmp_path / "o"), "--task", "generate", "--decoder",
                str(tiny_decoder))
    assert r.exit_code == 2 and "no target column" in r.stderr


# ---------------------------------------------------------------- speed: precision, loss slice, task defaults

def tiny_prefix_model(folder, precision="fp32", with_targets=True):
    """A PrefixDecoder over the tiny GPT-2 (frozen), with a batch of 3 records of different lengths."""
    import torch

    from mmllm.encoders import load_decoder
    from mmllm.tasks.generate import GenConfig, GenTable, PrefixDecoder, prepare_decoder

    decoder, tok, _ = load_decoder(str(folder))
    cfg = GenConfig(modalities=["image"], dims={"image": 6}, prefix_tokens=2, hidden_size=8, decoder=str(folder),
                    precision=precision)
    torch.manual_seed(0)
    model = PrefixDecoder(cfg, prepare_decoder(decoder, cfg)).eval()
    cols = {"id": ["a", "b", "c"], "text": ["it is big", None, "a much longer context text here"],
            "target": ["big red", "small blue thing", "red"], "has_image": [True, False, True],
            "image_emb": torch.randn(3, 6).numpy()}
    return model, GenTable(cols, ["image"], tok, with_targets=with_targets).batch(range(3))


def test_loss_over_target_positions_equals_the_decoders_own_loss(tiny_decoder):
    """forward's loss (LM head on the target positions only) is the decoder's causal-LM loss over the full
    sequence with the prefix and prompt masked: Hugging Face's ForCausalLMLoss is the reference."""
    import torch

    model, batch = tiny_prefix_model(tiny_decoder)
    assert model.keeps_logits  # GPT-2 takes logits_to_keep: the sliced path is the one under test
    inputs, mask, full = model.embed(batch)
    labels = batch["labels"]
    assert torch.equal(full, torch.cat([labels.new_full((3, inputs.shape[1] - labels.shape[1]), -100), labels], 1))
    with torch.no_grad():
        reference = model.decoder(inputs_embeds=inputs, attention_mask=mask, labels=full).loss
        ours = model(batch)["loss"]
        model.keeps_logits = False  # the fallback for decoders without logits_to_keep: full logits
        fallback = model(batch)["loss"]
    assert float(ours) == pytest.approx(float(reference), rel=1e-6)
    assert float(fallback) == pytest.approx(float(reference), rel=1e-6)


def test_decoder_precision_resolution_and_bf16_loss(tiny_decoder, monkeypatch):
    """auto: bf16 only for a frozen decoder on hardware with native bf16; a bf16 decoder's weights are bf16, the
    projector stays fp32, and its loss is within 2% of the fp32 loss (same weights, same batch)."""
    import torch

    from mmllm import encoders
    from mmllm.tasks.generate import resolve_decoder_precision

    monkeypatch.setattr(encoders, "native_bf16", lambda device="cpu": True)
    assert resolve_decoder_precision("auto", trainable=False) == "bf16"
    assert resolve_decoder_precision("auto", trainable=True) == "fp32"  # LoRA / --train-decoder train in fp32
    assert resolve_decoder_precision("fp32", trainable=False) == "fp32"
    monkeypatch.setattr(encoders, "native_bf16", lambda device="cpu": False)
    assert resolve_decoder_precision("auto", trainable=False) == "fp32"
    fp32, batch = tiny_prefix_model(tiny_decoder, "fp32")
    bf16, _ = tiny_prefix_model(tiny_decoder, "bf16")
    assert {p.dtype for p in bf16.decoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in bf16.proj.parameters()} == {torch.float32}
    with torch.no_grad():
        a, b = float(fp32(batch)["loss"]), float(bf16(batch)["loss"])
    assert b == pytest.approx(a, rel=0.02) and b != a
    bf16.train()
    bf16(batch)["loss"].backward()  # the gradient reaches the fp32 projector through the bf16 decoder
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in bf16.proj.parameters())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_decoder_precision_flag_is_recorded_and_reloaded(prepared, tiny_decoder, tmp_path, precision):
    out = tmp_path / "gen"
    gen_finetune(prepared, tiny_decoder, out, "--epochs", "1", "--decoder-precision", precision)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["generation"]["precision"] == precision
    import torch

    from mmllm.tasks.generate import load_checkpoint

    model, _ = load_checkpoint(out, cfg, "cpu")
    assert model.decoder.dtype == torch.float32  # decoding on a CPU: fp32 (bf16 matrix-vector products are slower)
    r = run_cli("eval", "model", str(out), str(prepared), "--max-new-tokens", "4", "--no-reliance")
    assert r.exit_code == 0, r.output


def test_decoder_precision_bf16_refused_for_a_trained_decoder(prepared, tiny_decoder, tmp_path):
    r = run_cli("finetune", str(prepared), "--output", str(tmp_path / "o"), "--task", "generate", "--decoder",
                str(tiny_decoder), "--train-decoder", "--decoder-precision", "bf16")
    assert r.exit_code == 2 and "--decoder-precision bf16: only for a frozen decoder" in r.stderr
    r = run_cli("finetune", str(prepared), "--output", str(tmp_path / "o"), "--decoder-precision", "fp32")
    assert r.exit_code == 2 and "--decoder-precision: only used by --task generate" in r.stderr


def test_task_defaults_budget_min_steps_and_relative_delta(prepared, tiny_decoder, tmp_path):
    from mmllm import tasks
    from mmllm.config import FinetuneConfig

    gen, cls = FinetuneConfig(task="generate"), FinetuneConfig()
    assert (gen.budget_steps, gen.min_steps, gen.min_rel_delta) == (80, 40, 0.01)
    assert (cls.budget_steps, cls.min_steps, cls.min_rel_delta) == (1500, 300, 0.0)
    given = FinetuneConfig(task="generate", budget_steps=1500, min_steps=0, min_rel_delta=0.0)
    assert (given.budget_steps, given.min_steps, given.min_rel_delta) == (1500, 0, 0.0)  # explicit values win
    assert set(tasks.get("generate").defaults) == set(tasks.get("classify").defaults)
    out = tmp_path / "gen"
    r = run_cli("finetune", str(prepared), "--output", str(out), "--task", "generate", "--decoder", str(tiny_decoder),
                "--batch-size", "8", "--hidden-size", "8", "--prefix-tokens", "1", "--budget-steps", "4")
    assert r.exit_code == 0, r.output
    saved = json.loads((out / "finetune_config.json").read_text())
    assert (saved["min_steps"], saved["min_rel_delta"], saved["budget_steps"]) == (40, 0.01, 4)  # what ran


def test_relative_min_delta(tmp_path):
    """With --min-rel-delta 0.01 a val_loss that improves by 0.5% an epoch is no improvement: training stops
    after --patience such epochs, keeping the first best; without it every epoch is a new best."""
    import torch

    from mmllm.config import FinetuneConfig
    from mmllm.loop import TrainState, early_stopping_update

    def epochs(rel: float) -> TrainState:
        cfg = FinetuneConfig(prepared="p", output="o", task="generate", patience=2, min_steps=0, min_rel_delta=rel)
        state, model = TrainState(initial_loss=1.0), torch.nn.Linear(2, 2)
        value = 0.1
        for epoch in range(1, 11):
            state.epoch, state.step, state.epoch_loss = epoch, 10 * epoch, 0.5
            early_stopping_update(state, model, {"val_loss": value}, cfg)
            if state.stopped_early:
                break
            value *= 0.995
        return state

    rel = epochs(0.01)
    assert rel.stopped_early and rel.epoch == 3 and rel.best_epoch == 1 and rel.best == 0.1
    assert "0.01 x best" in rel.stop_reason
    plain = epochs(0.0)
    assert not plain.stopped_early and plain.best_epoch == 10


@pytest.mark.parametrize("beams", [1, 2])
def test_batched_generation_equals_one_record_at_a_time(tiny_decoder, beams):
    """Records of different prompt lengths generated together (left-aligned, padding masked) give what each gives
    alone: the batch is a speed-up, never a different answer."""
    from mmllm.encoders import load_decoder

    model, batch = tiny_prefix_model(tiny_decoder, with_targets=False)
    _, tok, _ = load_decoder(str(tiny_decoder))
    together = model.generate(batch, tok, max_new_tokens=6, num_beams=beams)
    alone = []
    for i in range(3):
        n = int(batch["attention_mask"][i].sum())  # this record's prompt, without the batch's padding
        one = {k: v[i:i + 1] for k, v in batch.items()}
        one["input_ids"], one["attention_mask"] = one["input_ids"][:, :n], one["attention_mask"][:, :n]
        alone += model.generate(one, tok, max_new_tokens=6, num_beams=beams)
    assert len(set(batch["attention_mask"].sum(1).tolist())) == 3  # three prompt lengths: padding is exercised
    assert together == alone and len(set(alone)) > 1


def test_the_transcript_is_part_of_the_decoders_prompt(tiny_decoder):
    """What was said in the audio (prepare's transcript) reaches the decoder as words in its prompt."""
    from mmllm.encoders import load_decoder
    from mmllm.tasks.generate import GenTable, prompt_text

    _, tok, _ = load_decoder(str(tiny_decoder))
    cols = {"id": ["a", "b", "c"], "text": ["it is big", None, None], "transcript": ["red", "blue", None],
            "target": ["x", "y", "z"], "has_audio": [True, True, False], "audio_emb": [[0.0] * 4] * 3}
    table = GenTable(cols, ["audio"], tok, with_targets=False)
    expected = [tok(prompt_text(t, s), add_special_tokens=False)["input_ids"]
                for t, s in (("it is big", "red"), (None, "blue"), (None, None))]
    assert table.prompts == expected
    assert prompt_text("it is big", "red") == "Describe the input. Context: it is big Speech: red\nDescription:"
    assert prompt_text(None, None) == "Describe the input.\nDescription:"  # as before transcripts existed


def test_nothing_to_train_is_one_line(prepared, tiny_decoder, tmp_path):
    """A frozen decoder fed text alone has no projector: one line naming the fix, exit 2, no checkpoint."""
    r = run_cli("finetune", str(prepared), "--output", str(tmp_path / "o"), "--task", "generate", "--decoder",
                str(tiny_decoder), "--modalities", "text", "--epochs", "1")
    assert r.exit_code == 2, r.output
    assert "nothing to train" in r.stderr and "--lora-r" in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "o" / "config.json").exists()


# ---------------------------------------------------------------- stopping: EOS ids, --stop, default length

def test_stop_strings_end_each_row_and_are_cut_off(tiny_decoder):
    """--stop: each row ends at its first stop string (left out of the answer); other rows go on to their end."""
    from mmllm.encoders import load_decoder

    model, batch = tiny_prefix_model(tiny_decoder, with_targets=False)
    _, tok, _ = load_decoder(str(tiny_decoder))
    free = model.generate(batch, tok, max_new_tokens=8)
    row = max(range(len(free)), key=lambda i: len(free[i]))
    word = free[row].split()[-1]  # a word that this row says
    stopped = model.generate(batch, tok, max_new_tokens=8, stop=[word])
    for before, after in zip(free, stopped):
        assert after == (before[:before.find(word)].strip() if word in before else before)
    assert stopped[row] != free[row] and word not in stopped[row]
    unstopped, reasons = [], []
    assert model.generate(batch, tok, max_new_tokens=8, reasons=unstopped) == free
    assert model.generate(batch, tok, max_new_tokens=8, stop=[word], reasons=reasons) == stopped
    assert unstopped[row] == "length" and reasons[row] == "stop"  # ended by its stop string, not by the limit
    assert all(r == u for f, r, u in zip(free, reasons, unstopped) if word not in f)  # the other rows as before


def test_finish_reasons_say_stop_at_an_end_token_or_stop_string_else_length(tiny_decoder):
    from transformers import AutoTokenizer

    from mmllm.chat import finish_reasons

    tok = AutoTokenizer.from_pretrained(tiny_decoder)
    words = tok("red blue green", add_special_tokens=False)["input_ids"]
    end = tok.eos_token_id if tok.eos_token_id is not None else 0
    rows = [words + [end], words, words]
    texts = [tok.decode(r, skip_special_tokens=True) for r in rows]
    assert finish_reasons(rows, texts, [end], []) == ["stop", "length", "length"]
    assert finish_reasons(rows, texts, [end], ["blue"]) == ["stop", "stop", "stop"]
    assert finish_reasons([words[:1]], [tok.decode(words[:1])], [end], ["blue"]) == ["length"]


def test_stop_ids_take_the_generation_configs_eos_and_the_templates_end_of_turn(tiny_decoder):
    from transformers import AutoTokenizer, GenerationConfig

    from mmllm import chat

    tok = AutoTokenizer.from_pretrained(tiny_decoder)

    class Decoder:
        generation_config = GenerationConfig(eos_token_id=[tok.eos_token_id, tok.cls_token_id])

    assert chat.stop_ids(tok, Decoder, chat.PLAIN) == [tok.eos_token_id, tok.cls_token_id]
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}[MASK] {% endfor %}"  # end of turn != EOS
    assert chat.stop_ids(tok, None, chat.CHAT) == [tok.eos_token_id, tok.mask_token_id]
    ids, mask = chat.encode(tok, [{"role": "user", "content": "big"}, {"role": "assistant", "content": "red"}],
                            None, chat.CHAT)
    assert tok.convert_ids_to_tokens([i for i, m in zip(ids, mask) if m]) == ["red", "[MASK]"]


def test_defaults_from_the_training_answers_are_in_the_checkpoint(prepared, tiny_decoder, tmp_path):
    """The default --max-new-tokens comes from the longest training answer; a newline stops answers when no
    training answer has one; EOS is in the loss (pad == EOS does not mask it out)."""
    import datasets
    from transformers import AutoTokenizer

    out = tmp_path / "gen"
    r = run_cli("finetune", str(prepared), "--output", str(out), "--task", "generate", "--decoder", str(tiny_decoder),
                "--epochs", "1", "--hidden-size", "16", "--prefix-tokens", "2")
    assert r.exit_code == 0, r.output
    gen = json.loads((out / "config.json").read_text())["generation"]
    tok = AutoTokenizer.from_pretrained(tiny_decoder)
    train = datasets.load_from_disk(str(prepared))["train"]
    longest = max(len(tok(" " + t, add_special_tokens=False)["input_ids"]) + 1 for t in train["target"])
    assert gen["max_new_tokens"] == max(8, -(-5 * longest // 4) + 2)
    assert gen["stop"] == ["\n", "\nUser:"] and gen["prompt_format"] == "plain"

    from mmllm.tasks.generate import GenTable

    tok.pad_token = tok.eos_token  # pad == EOS, as SmolLM2's tokenizer has it
    table = GenTable({"id": ["a"], "target": ["big red"], "text": ["it is"]}, [], tok, with_targets=True, kind="plain")
    labels = table.batch([0])["labels"][0]
    assert labels[labels != -100].tolist()[-1] == tok.eos_token_id


def test_media_tokens_sequence_feeds_each_stored_vector_as_a_decoder_token(tiny_models, toy_manifest, tiny_decoder,
                                                                           tmp_path):
    """--media-tokens sequence: the image's stored spatial grid and the audio's frames, one decoder token each with
    a learned position; it trains, saves, loads and generates from raw records the same answers as eval; without
    stored sequences it is one line."""
    from mmllm.tasks.generate import load_checkpoint

    from conftest import tiny_prepare_args

    plain, seq = tmp_path / "plain", tmp_path / "seq"
    assert run_cli(*tiny_prepare_args(tiny_models, toy_manifest, plain)).exit_code == 0
    r = run_cli("finetune", str(plain), "--output", str(tmp_path / "no"), "--task", "generate", "--decoder",
                str(tiny_decoder), "--media-tokens", "sequence")
    assert r.exit_code == 2 and "prepare it again with --sequence-features" in r.output
    assert run_cli(*tiny_prepare_args(tiny_models, toy_manifest, seq), "--sequence-features").exit_code == 0
    out = tmp_path / "gen"
    gen_finetune(seq, tiny_decoder, out, "--media-tokens", "sequence", "--epochs", "4")
    cfg = json.loads((out / "config.json").read_text())["generation"]
    meta = json.loads((seq / "mmllm-prepared.json").read_text())
    assert cfg["media_tokens"] == "sequence"
    assert cfg["seq_lens"] == {m: meta["features"][f"{m}_seq"][0] for m in ("image", "audio")}
    epochs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in x]
    assert epochs[-1]["val_loss"] < epochs[0]["val_loss"]
    model, _ = load_checkpoint(out, json.loads((out / "config.json").read_text()), "cpu")
    assert set(model.positions) == {"image", "audio"} and model.positions["image"].shape[0] == cfg["seq_lens"]["image"]
    assert model.placeholder.shape[0] == 0  # every medium is a sequence: no pooled stand-in
    r = run_cli("predict", str(out), str(toy_manifest))
    assert r.exit_code == 0, r.output
    assert all(isinstance(x["generated"], str) for x in load_json_lines(r.stdout))


def test_image_tokens_pools_the_stored_grid(tiny_models, toy_manifest, tiny_decoder, tmp_path):
    """--image-tokens N: the image's stored grid average-pooled to N decoder tokens (2-D for square sizes: each
    token is the mean of its grid cells); recorded and used on load; refused without --media-tokens sequence or
    above the stored length."""
    import torch

    from conftest import tiny_prepare_args
    from mmllm.pooling import pool_tokens
    from mmllm.tasks.generate import load_checkpoint

    grid = torch.arange(16.0).view(1, 16, 1)  # a 4x4 grid, row by row
    assert pool_tokens(grid, 4, grid=True).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]  # each 2x2 block's mean
    assert pool_tokens(torch.arange(6.0).view(1, 6, 1), 2).flatten().tolist() == [1.0, 4.0]  # 1-D
    assert torch.equal(pool_tokens(grid, 16, grid=True), grid)
    import numpy as np

    from mmllm.pooling import pool_sequence

    fmap = np.arange(49, dtype=np.float32).reshape(49, 1)  # prepare stores a 7x7 map as 4x4 cells of it
    cells = pool_sequence(fmap, 16, grid=True)
    assert cells.shape == (16, 1) and cells[0, 0] == pytest.approx(np.mean([0, 1, 7, 8]))
    assert cells[15, 0] == pytest.approx(np.mean([40, 41, 47, 48]))
    seq = tmp_path / "seq"
    assert run_cli(*tiny_prepare_args(tiny_models, toy_manifest, seq), "--sequence-features").exit_code == 0
    stored = json.loads((seq / "mmllm-prepared.json").read_text())["features"]["image_seq"][0]
    r = run_cli("finetune", str(seq), "--output", str(tmp_path / "x"), "--task", "generate", "--decoder",
                str(tiny_decoder), "--image-tokens", "1")
    assert r.exit_code == 2 and "--image-tokens" in r.output and "--media-tokens sequence" in r.output
    r = run_cli("finetune", str(seq), "--output", str(tmp_path / "y"), "--task", "generate", "--decoder",
                str(tiny_decoder), "--media-tokens", "sequence", "--image-tokens", str(stored + 1))
    assert r.exit_code == 2 and f"grid has only {stored} vectors" in r.output
    out = tmp_path / "gen"
    gen_finetune(seq, tiny_decoder, out, "--media-tokens", "sequence", "--image-tokens", "1", "--epochs", "2")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["generation"]["pool"] == {"image": 1}
    model, _ = load_checkpoint(out, cfg, "cpu")
    assert model.positions["image"].shape[0] == 1 and model.positions["audio"].shape[0] == cfg["generation"][
        "seq_lens"]["audio"]
    r = run_cli("predict", str(out), str(toy_manifest))
    assert r.exit_code == 0, r.output


def test_audio_tokens_per_second_feeds_as_many_tokens_as_the_clip_lasts(tiny_models, tiny_decoder, tmp_path):
    """prepare --audio-tokens-per-second N stores ceil(N x seconds) vectors per clip (zero rows after its end, up to
    N x --max-audio-seconds); generation's --media-tokens sequence feeds only those: a 1.5 s clip gives 4 more
    decoder tokens than a 0.5 s one at 4 a second. A different rate never reuses cached features."""
    import numpy as np

    from conftest import tiny_prepare_args
    from mmllm.features import load_prepared
    from mmllm.tasks.generate import GenTable, load_checkpoint

    rows = []
    for i in range(24):
        seconds = 0.5 if i % 2 else 1.5
        write_wav(tmp_path / f"a{i}.wav", freq=300 + 50 * (i % 3), seconds=seconds)
        rows.append({"id": f"r{i}", "audio": f"a{i}.wav", "text": "it is",
                     "target": "a short one" if i % 2 else "a long one"})
    write_csv(tmp_path / "m.csv", rows)
    out = tmp_path / "p"
    args = [*tiny_prepare_args(tiny_models, tmp_path / "m.csv", out), "--sequence-features", "--no-transcribe",
            "--max-audio-seconds", "2"]
    assert run_cli(*args, "--audio-tokens-per-second", "4").exit_code == 0
    ds, meta = load_prepared(out)
    assert meta["features"]["audio_seq"][0] == 8 and meta["preprocessing"]["audio_tokens_per_second"] == 4
    split = ds["train"].with_format("numpy")
    for row in split:
        real = int((np.abs(row["audio_seq"]).sum(-1) > 0).sum())
        assert real == (6 if int(row["id"][1:]) % 2 == 0 else 2)
        assert not np.abs(row["audio_seq"][real:]).any()
    assert run_cli(*args, "--output", str(tmp_path / "q")).exit_code == 0  # rate 0: 16 per clip, not the cached 8
    assert load_prepared(tmp_path / "q")[1]["features"]["audio_seq"][0] == 16
    ck = tmp_path / "gen"
    gen_finetune(out, tiny_decoder, ck, "--media-tokens", "sequence", "--epochs", "2")
    config = json.loads((ck / "config.json").read_text())
    assert config["generation"]["ragged"] == ["audio"]
    model, tok = load_checkpoint(ck, config, "cpu")
    table = GenTable.from_split(ds["train"], model.cfg.modalities, tok, with_targets=False,
                                kind=model.cfg.prompt_format, sequences=tuple(model.cfg.sequenced()),
                                slots=model.cfg.slots())
    long_, short = (next(i for i, x in enumerate(table.ids) if int(x[1:]) % 2 == k) for k in (0, 1))
    lengths = [int(model.embed(table.batch([i]))[1].sum()) - len(table.prompts[i]) for i in (long_, short)]
    assert lengths == [6, 2]
    r = run_cli("predict", str(ck), str(tmp_path / "m.csv"))
    assert r.exit_code == 0, r.output
    assert len(load_json_lines(r.stdout)) == 24


def test_an_empty_system_turn_replaces_a_templates_long_default_system_prompt(tiny_decoder):
    """chat.lean_system: a template that injects a default system prompt (as SmolLM2's does) renders an empty system
    turn in fewer tokens, which training and generation then use; a template without one, or one that refuses a
    system turn, is left as it is. A record's own system text is kept."""
    from transformers import AutoTokenizer

    from mmllm import chat
    from mmllm.tasks.generate.core import GenTable

    tok = AutoTokenizer.from_pretrained(tiny_decoder)
    base = ("{% for m in messages %}[CLS] {{ m['role'] }} {{ m['content'] }} [SEP]{% endfor %}"
            "{% if add_generation_prompt %}[CLS] assistant{% endif %}")
    tok.chat_template = ("{% if messages[0]['role'] != 'system' %}[CLS] system it is a big red thing it is a small "
                         "blue thing [SEP]{% endif %}" + base)
    system, saved = chat.lean_system(tok, chat.CHAT)
    assert system == "" and saved > 5
    columns = {"id": ["a", "b"], "text": ["it is big", "it is small"], "target": ["red", "blue"],
               "conversation": [None, json.dumps({"messages": [{"role": "user", "content": "it is"},
                                                               {"role": "assistant", "content": "red"}],
                                                  "system": "it is one"})]}
    lean = GenTable(columns, [], tok, with_targets=True, kind=chat.CHAT, system=system)
    full = GenTable(columns, [], tok, with_targets=True, kind=chat.CHAT)
    assert len(full.answers[0][0]) - len(lean.answers[0][0]) == saved
    assert lean.answers[1][0] == full.answers[1][0]  # its own system text either way
    assert tok.decode(lean.prompts[1]).count("one") == 1
    tok.chat_template = base  # no default system prompt: nothing to save
    assert chat.lean_system(tok, chat.CHAT) == (None, 0)
    tok.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}" + base
    assert chat.lean_system(tok, chat.CHAT) == (None, 0)
    assert chat.lean_system(tok, chat.PLAIN) == (None, 0)


def test_training_conversations_longer_than_the_decoder_is_given_are_left_out_and_said(tiny_decoder, capsys):
    from transformers import AutoTokenizer

    from mmllm import chat
    from mmllm.records import RecordError
    from mmllm.tasks.generate.core import GenTable

    tok = AutoTokenizer.from_pretrained(tiny_decoder)
    columns = {"id": ["a", "b"], "text": ["red cat " * 40, "red"], "target": ["cat", "red"]}
    table = GenTable(columns, [], tok, with_targets=True, max_tokens=8, kind=chat.PLAIN)  # limit 4 x 8 = 32
    assert "1 record(s) longer than the 32 tokens the decoder is given (a) are left out" in capsys.readouterr().err
    assert table.ids == ["b"] and len(table) == 1 and table.targets == ["red"]  # never a part with no answer
    assert len(table.answers) == len(table.prompts) == 1 and len(table.answers[0][0]) < 32
    with pytest.raises(RecordError, match="at most 32") as refused:
        GenTable(columns, [], tok, with_targets=False, max_tokens=8, kind=chat.PLAIN)
    assert refused.value.record_id == "a" and refused.value.column == "text"
    said = {**columns, "text": ["red", "red"], "transcript": ["red cat " * 10, ""]}  # the transcript is the long part
    with pytest.raises(RecordError, match="its transcript is the longest part.*at most 20") as refused:
        GenTable(said, [], tok, with_targets=False, max_tokens=8, kind=chat.PLAIN, room=20)  # the decoder's room
    assert refused.value.column == "transcript"


# ---------------------------------------------------------------- --retrieve: retrieval-augmented generation

def test_memory_hints_are_the_nearest_answers_and_a_record_never_retrieves_itself(tmp_path):
    import numpy as np

    from mmllm.tasks.generate.retrieval import HINT, Memory, keys_of

    emb = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], np.float32)
    cols = {"image_emb": emb, "has_image": [True] * 4, "target": ["red one", "red two", "blue one", "blue two"]}
    memory = Memory(keys_of(cols, ["image"]), cols["target"])
    assert memory.hints(cols, ["image"], 1, own=True) == [HINT.format(t) for t in
                                                          ("red two", "red one", "blue two", "blue one")]
    # a record without a target stays in its row (own=True is by position) and is never retrieved
    blank = Memory(keys_of(cols, ["image"]), ["red one", None, "blue one", "blue two"])
    assert blank.hints(cols, ["image"], 1, own=True) == [HINT.format(t) for t in
                                                         ("blue two", "red one", "blue two", "blue one")]
    query = {"image_emb": np.array([[1, 0.05], [0.2, 1]], np.float32), "has_image": [True, True]}
    assert memory.hints(query, ["image"], 2) == [HINT.format("red one; red two"), HINT.format("blue two; blue one")]
    # a missing modality counts 0: the mean of per-modality cosines, not a cosine over zeros
    two = {**cols, "audio_emb": emb[::-1].copy(), "has_audio": [True, True, False, False]}
    keys = keys_of(two, ["image", "audio"])
    assert float(keys[0] @ keys[0]) == pytest.approx(1.0) and float(keys[2] @ keys[2]) == pytest.approx(0.5)
    memory.save(tmp_path)
    again = Memory.load(tmp_path)
    assert again.answers == memory.answers and again.hints(query, ["image"], 2) == memory.hints(query, ["image"], 2)


def test_retrieve_puts_the_nearest_training_answers_in_each_prompt_and_travels_with_the_checkpoint(
        prepared, tiny_decoder, toy_manifest, tmp_path):
    import datasets

    out = tmp_path / "gen"
    gen_finetune(prepared, tiny_decoder, out, "--retrieve", "2")
    config = json.loads((out / "config.json").read_text())
    assert config["generation"]["retrieve"] == 2
    assert (out / "retrieval.safetensors").is_file() and "retrieval.json" in (out / "README.md").read_text()
    train = datasets.load_from_disk(str(prepared))["train"]
    answers = json.loads((out / "retrieval.json").read_text())["answers"]
    assert sorted(answers) == sorted(t for t in train["target"] if t)
    from mmllm.predict import Predictor

    predictor = Predictor(str(out), device="cpu")
    row = {"id": "x", "text": "it is big", "image_emb": [train[0]["image_emb"]], "has_image": [True],
           "audio_emb": [train[0]["audio_emb"]], "has_audio": [True]}
    columns = {k: v if isinstance(v, list) else [v] for k, v in row.items()}
    table = predictor.model.table(columns, predictor.tokenizer, with_targets=False)
    prompt = predictor.tokenizer.decode(table.prompts[0])
    predictor.model.memory = None
    bare = predictor.tokenizer.decode(predictor.model.table(columns, predictor.tokenizer, False).prompts[0])
    assert train[0]["target"] in prompt and train[0]["target"] not in bare  # its own features: it is the nearest
    r = run_cli("predict", str(out), str(toy_manifest), "--max-new-tokens", "4")
    assert r.exit_code == 0, r.output
    assert len(load_json_lines(r.stdout)) == 48
    (out / "retrieval.json").unlink()
    r = run_cli("predict", str(out), str(toy_manifest))
    assert r.exit_code != 0 and "retrieval.json (the --retrieve memory) is missing" in r.output
