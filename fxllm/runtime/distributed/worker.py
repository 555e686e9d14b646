"""A worker rank (1..N-1): builds its part of the model, then runs every step rank 0 sends it."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import traceback
from multiprocessing.connection import Connection

from fxllm.config import FxllmConfig
from fxllm.runtime.distributed.channel import PeerGone, parent_alive, receive, receive_step
from fxllm.runtime.gc_heap import freeze_heap, should_freeze

logger = logging.getLogger(__name__)


def _build_runner(config: FxllmConfig, rank: int, port: int, conn: Connection, parent_pid: int) -> object:
    from fxllm.compiler.cache_build import build_graph
    from fxllm.passes.pipeline import load_plugins
    from fxllm.passes.runtime_signature import require_signature
    from fxllm.runtime.distributed.group import cpu_threads_per_rank, init_group, rank_device
    from fxllm.runtime.distributed.rank_model import load_rank_model
    from fxllm.runtime.engine import resolve_device_dtype
    from fxllm.runtime.model_runner import ModelRunner, plan_num_blocks

    load_plugins(config.compile.plugins)
    device, dtype = resolve_device_dtype(config.model.device, config.model.dtype)
    device = rank_device(device, rank)
    if device.type == "cpu":
        cpu_threads_per_rank(config.parallel.tensor_parallel_size)
    conn.send(("started",))  # rank 0 joins the group only once every worker got this far
    group_name = init_group(config.parallel, rank, port, device, dtype)
    model, _tokenizer = load_rank_model(config, device, dtype, rank, group_name)
    built = build_graph(config, model, config.model.model, device, dtype)
    del model
    conn.send(("planned", plan_num_blocks(require_signature(built.gm).kv_layers, config.cache, device)))
    _, num_blocks = receive(
        conn, alive=lambda: parent_alive(parent_pid), timeout_s=None, what="rank 0's pool size"
    )
    cache = dataclasses.replace(config.cache, num_blocks=num_blocks)
    return ModelRunner(built.gm, config.compile.backend, device, dtype, cache)


def _serve(runner: object, conn: Connection, parent_pid: int) -> None:
    device = runner.device  # type: ignore[attr-defined]
    while True:
        message = receive(
            conn, alive=lambda: parent_alive(parent_pid), timeout_s=None, what="rank 0's next step"
        )
        kind = message[0]
        if kind == "step":
            runner.execute(receive_step(message[1], device))  # type: ignore[attr-defined]
        elif kind == "decode_graphs":
            batch_sizes, max_model_len, capture, query_lens, verify_max_batch = message[1:]
            runner.enable_decode_graphs(  # type: ignore[attr-defined]
                batch_sizes,
                max_model_len,
                capture=capture,
                query_lens=query_lens,
                verify_max_batch=verify_max_batch,
            )
        elif kind == "freeze_guards":
            runner.freeze_guards()  # type: ignore[attr-defined]
        elif kind == "stop":
            return
        else:
            raise RuntimeError(f"unknown command {kind!r} from rank 0")


def worker_main(
    config: FxllmConfig, rank: int, port: int, conn: Connection, parent_pid: int, log_level: int
) -> None:
    """Entry point of a spawned worker: build, report ready, run steps until rank 0 says stop or exits."""
    logging.basicConfig(level=log_level, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    code = 0
    try:
        runner = _build_runner(config, rank, port, conn, parent_pid)
        if should_freeze(config.scheduler.gc_freeze, runner.device.type):
            freeze_heap()  # a worker's collection pause stalls every rank at the next collective
        conn.send(("ready",))
        _serve(runner, conn, parent_pid)
    except PeerGone as exc:
        logger.error("rank %d: rank 0 is gone (%s); exiting", rank, exc)
        code = 1
    except BaseException as exc:  # reported to rank 0, which raises it
        logger.error("rank %d failed: %s", rank, exc)
        with contextlib.suppress(OSError):
            conn.send(("error", f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    # Skip interpreter teardown: a destroyed group's threads or a compile worker pool must not hang the exit.
    os._exit(code)
