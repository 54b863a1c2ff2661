"""`prepare --engine ray`: chunks of records decoded and encoded by encoder actors on a Ray cluster (Ray Data).

This process reads the manifest, checks the records, assigns splits and writes the prepared data exactly as the
local engine does (preparation.py); only the per-chunk work moves: each actor loads the encoders once and runs the local
engine's functions on its chunks (features.load_chunk: cache lookup, hashing and decoding; features.encode_chunk:
the batched encoders and the rows), so features, feature-cache keys and skipped records are the same. The rows come
back as Arrow in record order (Ray Data's preserve_order), the skipped records and counters beside them.

On a real cluster mmllm (and the models it names) must be installed on every node and media paths readable there
(a shared file system): see the README. Ray is imported only inside these functions, so `import mmllm` and
`mmllm --help` never import it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from mmllm.config import PrepareConfig
from mmllm.console import log, set_quiet
from mmllm.errors import UserError
from mmllm.features import FeatureStore, Preprocessing, arrow_schema, encode_chunk, load_chunk, load_encoders

INSTALL = "pip install 'mmllm[ray]'"
ACTOR_START_S = 300  # encoder actors not all started by then: the cluster lacks their CPUs (an error, not a hang)


def require() -> Any:
    """The `ray` module, or the one-line error that says how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UserError(f"--engine ray: Ray is not installed here ({INSTALL})") from None
    return ray


@contextmanager
def cluster(cfg: PrepareConfig) -> Iterator[str | None]:
    """Connected to a Ray cluster meanwhile: the one this process already joined (ray.init in a notebook or a test),
    else --ray-address (None: the running one on this machine, else a new local one, stopped afterwards). An auto
    --precision is resolved where the encoders run (a worker), not here: the context gives it (None: not auto)."""
    ray = require()
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=cfg.ray_address, logging_level="WARNING")
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UserError(f"--ray-address {cfg.ray_address}: no Ray cluster to connect to ({first_line(e)}); start "
                            "one with `ray start --head`, or leave --ray-address out for a local one") from None
    try:
        resolved = None
        if cfg.precision == "auto":
            from mmllm.encoders import resolve_precision

            resolved = ray.get(ray.remote(num_cpus=1)(resolve_precision).remote("auto"))
            log(f"precision auto on the Ray workers: {resolved}")
        yield resolved
    finally:
        if started:
            ray.shutdown()


def encoded_chunks(records: list[dict], encoders: dict, cfg: PrepareConfig, schema: Any, tally: dict, chunk: int
                   ) -> Iterator[tuple[Any, list[dict], int]]:
    """(Arrow rows, errors, records) per chunk of `chunk` records, in record order, each encoded by one of the
    cluster's encoder actors (one per CPU). `encoders`: this process's, for their identities (weights load lazily,
    on first use: never here)."""
    import pyarrow as pa
    import ray
    import ray.data
    from ray.util.debug import log_once

    from mmllm import __version__

    actors = max(1, int(ray.cluster_resources().get("CPU", 1)))
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    tally["engine"].update(actors=actors, nodes=nodes)
    chunk = max(1, min(chunk, math.ceil(len(records) / actors)))  # a small input still reaches every actor
    log(f"ray: {actors} encoder actors on {nodes} node{'s' if nodes > 1 else ''}, chunks of {chunk} records")
    roles = [role for role in encoders if role != "transcript"]
    expected = {"mmllm": __version__, **{role: enc.identity for role, enc in encoders.items()}}
    ctx = ray.data.DataContext.get_current()
    options = ctx.execution_options
    saved = options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.wait_for_min_actors_s
    options.preserve_order = True  # rows come back in record order, as the local engine writes them
    ctx.enable_progress_bars = False  # prepare's own bar counts the records
    ctx.print_on_execution_start = False
    ctx.wait_for_min_actors_s = ACTOR_START_S
    data_log = logging.getLogger("ray.data")
    level = data_log.level
    data_log.setLevel(logging.WARNING)  # not its INFO lines (prepare says what happened)
    log_once("ray_data_progress_manager_disabled")  # nor its note that its bars are off
    pids: set[int] = set()
    try:
        items = ray.data.from_items([{"record": pickle.dumps(r)} for r in records],
                                    override_num_blocks=max(1, math.ceil(len(records) / chunk)))
        # one chunk in flight per actor: every chunk starts on this node, and Ray Data would queue chunks on the
        # actors here (locality) while the other nodes' wait
        pool = ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1)
        out = items.map_batches(EncoderActor, fn_constructor_args=(cfg, roles, expected), batch_size=chunk,
                                batch_format="pyarrow", compute=pool, num_cpus=1)
        for block in out.iter_batches(batch_format="pyarrow", batch_size=None):
            for r in block.to_pylist():
                if r["problem"]:  # an actor could not load the encoders, or they are not this process's
                    raise UserError(r["problem"])
                batch = pa.ipc.open_stream(r["rows"]).read_all().combine_chunks().to_batches()
                batch = batch[0] if batch else pa.RecordBatch.from_pylist([], schema=schema)
                if not batch.schema.equals(schema):
                    raise UserError("--engine ray: a worker wrote other columns than this process would (another "
                                    "mmllm version on the cluster?)")
                stats = json.loads(r["stats"])
                add_stats(tally, encoders, stats)
                pids.add(stats["pid"])
                yield batch, json.loads(r["errors"]), r["records"]
    finally:
        (options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start,
         ctx.wait_for_min_actors_s) = saved
        data_log.setLevel(level)
    log(f"ray: chunks encoded by {len(pids)} of {actors} actors")


def add_stats(tally: dict, encoders: dict, stats: dict) -> None:
    """A chunk's counters into the run's: features reused / encoded, and the transcriber's clips and rejections
    (this process's transcriber reports them, as if it had transcribed)."""
    tally["hits"] += stats["hits"]
    tally["misses"] += stats["misses"]
    transcriber = encoders.get("transcript")
    if transcriber is not None:
        transcriber.clips += stats["clips"]
        for why, n in stats["rejected"].items():
            transcriber.rejected[why] = transcriber.rejected.get(why, 0) + n


class EncoderActor:
    """A Ray Data actor: the encoders loaded once (checked to be the driver's), then chunks of records (pickled, one
    per row) -> one row: the chunk's Arrow rows (IPC stream bytes), its skipped records and counters (JSON), or the
    problem (a user's, one line) that keeps this actor from encoding: returned, not raised, so that the driver
    reports that line rather than Ray's tracebacks."""

    OUT = {"rows": "binary", "errors": "string", "stats": "string", "records": "int64", "problem": "string"}

    def __init__(self, cfg: PrepareConfig, roles: list[str], expected: dict):
        from concurrent.futures import ThreadPoolExecutor

        from mmllm import __version__

        set_quiet(True)  # the driver says what the run does; warnings still reach its stderr
        self.problem = None
        try:
            self.encoders = load_encoders(cfg, roles)
        except UserError as e:
            self.problem = f"--engine ray: node {platform.node()}: {e}"
            return
        here = {"mmllm": __version__, **{role: enc.identity for role, enc in self.encoders.items()}}
        if here != expected:
            differ = ", ".join(f"{k} {here.get(k)} here vs {v}" for k, v in expected.items() if here.get(k) != v)
            self.problem = (f"--engine ray: node {platform.node()} has other encoders or mmllm than the driver "
                            f"({differ}): install the same there")
            return
        self.pre = Preprocessing.of(cfg, self.encoders.get("transcript"))
        self.store = FeatureStore(cfg.cache)
        self.schema = arrow_schema(self.encoders, self.pre)
        self.workers = ThreadPoolExecutor(cfg.num_workers) if cfg.num_workers > 0 else None

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        schema = pa.schema([(k, getattr(pa, t)()) for k, t in self.OUT.items()])
        if self.problem:
            return pa.table({"rows": [b""], "errors": ["[]"], "stats": ["{}"], "records": [0],
                             "problem": [self.problem]}, schema=schema)
        chunk = [pickle.loads(b) for b in batch.column("record").to_pylist()]
        transcriber = self.encoders.get("transcript")
        hits, misses = self.store.reused, self.store.misses
        clips, rejected = (transcriber.clips, dict(transcriber.rejected)) if transcriber else (0, {})
        loaded = load_chunk(chunk, self.encoders, self.store, self.pre, self.workers)
        rows, errors = encode_chunk(loaded, self.encoders, self.store, self.pre)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, self.schema) as w:
            w.write_batch(pa.RecordBatch.from_pylist(rows, schema=self.schema))
        stats = {"hits": self.store.reused - hits, "misses": self.store.misses - misses, "pid": os.getpid(),
                 "clips": transcriber.clips - clips if transcriber else 0,
                 "rejected": {k: n - rejected.get(k, 0) for k, n in transcriber.rejected.items()
                              if n > rejected.get(k, 0)} if transcriber else {}}
        return pa.table({"rows": [sink.getvalue().to_pybytes()], "errors": [json.dumps(errors)],
                         "stats": [json.dumps(stats)], "records": [len(chunk)], "problem": [None]}, schema=schema)


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
