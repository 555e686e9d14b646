"""Rank 0's side of a tensor-parallel engine: spawns the workers, watches them, forwards every step.

`start_tensor_parallel(config)` spawns ranks 1..N-1 (one process each) and joins the group as rank 0;
the builder then loads rank 0's shards, builds its graph, agrees on the KV pool size with the workers
(`agree_num_blocks`) and wraps its runner (`wrap_runner`): each step is announced on the workers' pipes
and its inputs broadcast before rank 0 runs the same graph, so every rank's collectives meet. Only
rank 0 samples. A watchdog thread sees a worker exit: the next step raises, and a step already waiting
in a collective fails when the group notices the lost peer (gloo at once; NCCL after
parallel.collective_timeout_s at the latest), so a dead rank ends the run with an error, not a hang.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import multiprocessing as mp
import os
import threading
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

import torch

from fxllm.config import FxllmConfig
from fxllm.passes.runtime_signature import require_signature
from fxllm.runtime.distributed.channel import broadcast_step, receive, step_header
from fxllm.runtime.distributed.group import (
    cpu_threads_per_rank,
    destroy_group,
    free_port,
    init_group,
    rank_device,
)
from fxllm.runtime.distributed.rank_model import check_size_early, load_rank_model
from fxllm.runtime.distributed.worker import worker_main
from fxllm.runtime.engine_setup import resolve_device_dtype
from fxllm.runtime.model_runner import ModelRunner, plan_num_blocks

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 3600.0  # loading + compiling a 70B rank can take long; a dead worker fails at once


class RankDied(RuntimeError):
    """A tensor-parallel worker process exited while the engine ran."""


class TensorParallelGroup:
    """The worker processes of a tensor-parallel engine, seen from rank 0."""

    def __init__(self, config: FxllmConfig, device: torch.device) -> None:
        self.size = config.parallel.tensor_parallel_size
        check_size_early(config)  # a size that does not divide the heads fails before any process starts
        port = config.parallel.master_port or free_port()
        context = mp.get_context("spawn")  # CUDA and a forked compiled runtime do not mix
        self.procs: list[Any] = []
        self.conns: list[Connection] = []
        level = logging.getLogger("fxllm").getEffectiveLevel()
        for rank in range(1, self.size):
            parent, child = context.Pipe()
            proc = context.Process(
                target=worker_main, args=(config, rank, port, child, os.getpid(), level),
                name=f"fxllm-tp-rank{rank}", daemon=True,
            )  # fmt: skip
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        self.dead: str | None = None
        # Called once with the reason when a worker exits (the server sends itself SIGTERM); None: the next
        # step raises RankDied.
        self.on_death: Callable[[str], None] | None = None
        self._stopped = False
        atexit.register(self.shutdown)
        self.device = rank_device(device, 0)
        if self.device.type == "cpu":
            logger.info("tensor parallel on the CPU: %d threads per rank", cpu_threads_per_rank(self.size))
        with self._stop_on_error():
            # A worker that fails to import or start fails here, not in a rendezvous that waits for it.
            self._receive_all("start")
            _, dtype = resolve_device_dtype(config.model.device, config.model.dtype)
            self.group_name = init_group(config.parallel, 0, port, self.device, dtype)
        self._watchdog = threading.Thread(target=self._watch, name="fxllm-tp-watchdog", daemon=True)
        self._watchdog.start()

    def _watch(self) -> None:
        while not self._stopped:
            for rank, proc in enumerate(self.procs, start=1):
                if not proc.is_alive() and not self._stopped and self.dead is None:
                    self.dead = f"tensor-parallel rank {rank} exited with code {proc.exitcode}"
                    logger.error("%s: the engine stops (every rank runs every step)", self.dead)
                    if self.on_death is not None:
                        self.on_death(self.dead)
            threading.Event().wait(0.2)

    def _receive_all(self, what: str) -> list[Any]:
        answers = []
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), start=1):
            message = receive(
                conn, alive=proc.is_alive, timeout_s=STARTUP_TIMEOUT_S, what=f"rank {rank}'s {what}"
            )
            if message[0] == "error":
                raise RuntimeError(f"tensor-parallel worker failed while building: {message[1]}")
            answers.append(message)
        return answers

    def agree_num_blocks(self, own: int) -> int:
        """The KV pool size every rank can hold (the smallest of their plans), sent to the workers."""
        planned = [own, *(m[1] for m in self._receive_all("KV pool plan"))]
        num_blocks = min(planned)
        for conn in self.conns:
            conn.send(("num_blocks", num_blocks))
        logger.info("tensor parallel: KV pool of %d blocks on every rank (plans %s)", num_blocks, planned)
        return num_blocks

    def load_model(
        self, config: FxllmConfig, dtype: torch.dtype, tokenizer: Any
    ) -> tuple[torch.nn.Module, Any]:
        """Rank 0's shards of the model (and its tokenizer, unless one was given)."""
        with self._stop_on_error():
            model, own_tokenizer = load_rank_model(config, self.device, dtype, 0, self.group_name)
        return model, own_tokenizer if tokenizer is None else tokenizer

    def make_runner(self, gm: Any, config: FxllmConfig, dtype: torch.dtype) -> RankZeroRunner:
        """Rank 0's runner over a KV pool every rank can hold, once every worker is ready."""
        with self._stop_on_error():
            own = plan_num_blocks(require_signature(gm).kv_layers, config.cache, self.device)
            cache = dataclasses.replace(config.cache, num_blocks=self.agree_num_blocks(own))
            runner = ModelRunner(gm, config.compile.backend, self.device, dtype, cache)
            return self.wrap_runner(runner)

    @contextlib.contextmanager
    def _stop_on_error(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            self.shutdown()
            raise

    def wrap_runner(self, runner: Any) -> RankZeroRunner:
        """Wait until every worker is ready; returns `runner` forwarding each step to the workers."""
        self._receive_all("ready signal")
        return RankZeroRunner(runner, self)

    def send(self, *message: Any) -> None:
        """Send a command to every worker; raises RankDied once one has exited."""
        if self.dead is not None:
            raise RankDied(self.dead)
        try:
            for conn in self.conns:
                conn.send(message)
        except OSError as exc:
            raise RankDied(f"a tensor-parallel worker closed its pipe: {exc}") from exc

    def shutdown(self) -> None:
        """Stop the workers and leave the group (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(("stop",))
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                logger.warning("tensor-parallel worker %s did not stop; terminating it", proc.name)
                proc.terminate()
                proc.join(timeout=5)
        destroy_group()


class RankZeroRunner:
    """Rank 0's ModelRunner: each call is announced to the workers first, so all ranks run it together."""

    def __init__(self, runner: Any, group: TensorParallelGroup) -> None:
        self._runner = runner
        self.group = group

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def execute(self, inputs: Any) -> torch.Tensor:
        """Broadcast the step's inputs, then run rank 0's part; a collective error names a dead rank."""
        self.group.send("step", step_header(inputs))
        try:
            broadcast_step(inputs)
            return self._runner.execute(inputs)  # type: ignore[no-any-return]
        except RuntimeError as exc:
            if self.group.dead is None:
                threading.Event().wait(0.5)  # the watchdog names the rank if one died
            if self.group.dead is not None:
                raise RankDied(f"{self.group.dead}; the step failed: {exc}") from exc
            raise

    def enable_decode_graphs(
        self,
        batch_sizes: list[int],
        max_model_len: int,
        *,
        capture: bool,
        query_lens: list[int] | None = None,
        verify_max_batch: int = 0,
    ) -> float:
        """Capture the decode and verify buckets on every rank at once (their graphs hold the collectives);
        the verify buckets follow what the speculative decoder set on this wrapper, the same on every rank."""
        lens = list(self.verify_query_lens if query_lens is None else query_lens)
        max_batch = verify_max_batch or self.verify_max_batch
        self.group.send("decode_graphs", batch_sizes, max_model_len, capture, lens, max_batch)
        return self._runner.enable_decode_graphs(  # type: ignore[no-any-return]
            batch_sizes, max_model_len, capture=capture, query_lens=lens, verify_max_batch=max_batch
        )

    def freeze_guards(self) -> bool:
        """Freeze Dynamo's guard checks on every rank."""
        self.group.send("freeze_guards")
        return self._runner.freeze_guards()  # type: ignore[no-any-return]

    def shutdown(self) -> None:
        """Stop the workers."""
        self.group.shutdown()


def start_tensor_parallel(config: FxllmConfig, device: torch.device) -> TensorParallelGroup:
    """Spawn the workers of a `parallel.tensor_parallel_size` engine and join the group as rank 0."""
    return TensorParallelGroup(config, device)
