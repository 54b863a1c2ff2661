"""Training loop: mmllm's fit_epoch against transformers.Trainer on the same model, data and steps; and the
achieved FLOP/s of a text-model training step against dense matmul."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import encoder, median_time, quiet_stdout

MODALITIES = ["text", "image", "audio"]
BATCH = 32
TARGET = "mmllm records/s >= 1.0x Trainer"


class Indexes(torch.utils.data.Dataset):
    """Record indexes; the collator builds the batch from the feature table, as mmllm does."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


class Wrapped(torch.nn.Module):
    """Trainer calls model(**batch) and reads outputs["loss"]."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, **batch):
        return {"loss": self.inner(batch)["loss"]}


class Loops:
    """Both training loops over the same prepared training split, each run from a freshly seeded model."""

    def __init__(self, prepared: Path):
        from mmllm.batches import FeatureTable
        from mmllm.features import load_prepared

        data, meta = load_prepared(prepared)
        self.prepared, self.labels = prepared, meta["labels"]
        self.train = FeatureTable.from_split(data["train"], MODALITIES, {n: i for i, n in enumerate(self.labels)}, 0)
        self.text = encoder("text")

    def model(self):
        from mmllm.model import ModelConfig, build_model

        torch.manual_seed(0)
        return build_model(ModelConfig(modalities=MODALITIES, num_labels=len(self.labels), text_dim=384,
                                       dims={"image": 1280, "audio": 384}), self.text.build_model())

    def ours(self, n_steps: int) -> float:
        """Seconds of the fit_epoch code path finetune runs, one epoch capped at n_steps steps."""
        from mmllm.config import FinetuneConfig
        from mmllm.loop import StopFlag, TrainState, fit_epoch, make_optimizer, make_scheduler, plan_schedule
        from mmllm.runtime import Dist

        model = self.model()
        cfg = FinetuneConfig(prepared=str(self.prepared), output="x", batch_size=BATCH, max_steps=n_steps,
                             warmup_ratio=0.0)
        opt = make_optimizer(model, cfg)
        plan = plan_schedule(cfg, len(self.train), 1)
        sched = make_scheduler(opt, cfg, plan.total_steps, plan.warmup_steps)
        t = time.perf_counter()
        fit_epoch(model, model, self.train, opt, sched, cfg, Dist(), TrainState(), StopFlag(), None)
        return time.perf_counter() - t

    def theirs(self, n_steps: int) -> float:
        """Seconds of transformers.Trainer.train() for n_steps steps with the same settings."""
        from transformers import Trainer, TrainingArguments

        with tempfile.TemporaryDirectory() as tmp:
            args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=BATCH, max_steps=n_steps,
                                     learning_rate=1e-3, report_to=[], save_strategy="no", logging_strategy="no",
                                     disable_tqdm=True, use_cpu=True, dataloader_num_workers=0, max_grad_norm=1.0,
                                     lr_scheduler_type="cosine")
            trainer = Trainer(model=Wrapped(self.model()), args=args, train_dataset=Indexes(len(self.train)),
                              data_collator=lambda idx: self.train.batch(idx))
            with quiet_stdout():
                t = time.perf_counter()
                trainer.train()
                return time.perf_counter() - t


def step_flops(text) -> dict:
    """Achieved FLOP/s of a MiniLM training step (batch 32, 32 tokens) and of a 1024^3 matmul."""
    bert = text.build_model().train()
    ids = torch.randint(1000, 2000, (BATCH, 32))
    opt = torch.optim.AdamW(bert.parameters(), lr=1e-5)

    def step():
        out = bert(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.mean()
        out.backward()
        opt.step()
        opt.zero_grad()

    step()
    step_s = median_time(step, 3)
    n_params = sum(p.numel() for n, p in bert.named_parameters() if p.dim() >= 2 and "embeddings" not in n
                   and "pooler" not in n)  # the matrices every token passes through
    flops = 6 * n_params * ids.numel()  # forward + backward; attention score FLOPs left out (short sequences)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    torch.mm(a, b)
    mm_s = median_time(lambda: [torch.mm(a, b) for _ in range(10)], 3) / 10
    step_rate, mm_rate = flops / step_s, 2 * 1024 ** 3 / mm_s
    return {"text_step_flops_per_s": step_rate, "matmul_flops_per_s": mm_rate, "mfu_fraction": step_rate / mm_rate}


def run(prepared: Path, steps: int, repeat: int) -> dict:
    """ratio = Trainer seconds / mmllm seconds (= mmllm records/s / Trainer records/s), medians of `repeat`."""
    from mmllm import console

    console.set_quiet(True)
    loops = Loops(prepared)
    if steps * BATCH > len(loops.train):
        raise ValueError(f"{steps} steps of {BATCH} need {steps * BATCH} training records; {prepared} has "
                         f"{len(loops.train)}")
    loops.ours(1), loops.theirs(1)  # warm-up
    runs_ours, runs_theirs = [], []
    for _ in range(repeat):  # alternate, medians: the machine is shared and noisy
        runs_ours.append(loops.ours(steps))
        runs_theirs.append(loops.theirs(steps))
    ours_s, theirs_s = statistics.median(runs_ours), statistics.median(runs_theirs)
    n_records = steps * BATCH
    return {"records": n_records, "mmllm_records_per_s": n_records / ours_s,
            "trainer_records_per_s": n_records / theirs_s, "ratio": theirs_s / ours_s, **step_flops(loops.text),
            "target": TARGET, "met": theirs_s / ours_s >= 1.0}


def report(r: dict) -> tuple[list[str], list[str]]:
    """(table rows, other figures) for BENCHMARKS.md."""
    return ([f"| training loop | {r['mmllm_records_per_s']:.1f} records/s | transformers.Trainer "
             f"{r['trainer_records_per_s']:.1f} records/s | {r['ratio']:.2f}x | {r['target']} | {r['met']} |"],
            [f"- text-model training step: {r['text_step_flops_per_s'] / 1e9:.1f} GFLOP/s achieved vs "
             f"{r['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s dense matmul ({100 * r['mfu_fraction']:.0f}%)"])
