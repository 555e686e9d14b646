"""`fxllm serve` / `python -m fxllm.serve`: build the LLM from config.yml and run the server."""

from __future__ import annotations

import argparse
import logging
import os
import signal
from typing import TYPE_CHECKING

import fxllm
from fxllm.config import FxllmConfig, load_config

if TYPE_CHECKING:
    from fxllm.llm import LLM

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The command line of `fxllm serve`."""
    p = argparse.ArgumentParser(
        prog="fxllm serve", description="OpenAI-compatible server over fxllm's engine"
    )
    p.add_argument("model", nargs="?", help="model: smollm2 (embedded), a preset, an HF folder or a .gguf file "
                   "(default: model.model from the config)")  # fmt: skip
    p.add_argument("--config", "-c", help="config.yml (every section; see docs/serving.md)")
    p.add_argument("--host", help="bind address (server.host, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (server.port, default 8000)")
    p.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' on /v1 (server.api_key; env FXLLM_API_KEY)"
    )
    p.add_argument("--served-model-name", help="the model name clients send (server.served_model_name)")
    p.add_argument("--set", "-o", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. -o scheduler.max_num_seqs=32 (repeatable)")  # fmt: skip
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--tp", type=int, help="tensor parallel ranks, one process each (parallel.tensor_parallel_size)"
    )
    return p


def config_from_args(args: argparse.Namespace) -> FxllmConfig:
    """The config tree: config.yml, then -o overrides, then the dedicated flags."""
    config = load_config(args.config, args.overrides)
    for flag, key in (("host", "host"), ("port", "port"), ("api_key", "api_key"),
                      ("served_model_name", "served_model_name")):  # fmt: skip
        value = getattr(args, flag)
        if value is not None:
            setattr(config.server, key, value)
    if args.model:
        config.model.model = args.model
    if getattr(args, "tp", None) is not None:
        if args.tp < 1:
            raise ValueError(f"--tp must be >= 1, got {args.tp}")
        config.parallel.tensor_parallel_size = args.tp
    return config


def log_startup(llm: LLM, config: FxllmConfig) -> None:
    """Log what is served, where, with how much KV cache, and what the compiler did."""
    engine, server = llm.engine, config.server
    logger.info("fxllm %s serving %r as %r on %s (%s)", fxllm.__version__, config.model.model,
                server.served_model_name or config.model.model, llm.info.device, llm.info.dtype)  # fmt: skip
    logger.info("context %d tokens; KV cache capacity %d tokens (%d blocks x %d); max_num_seqs %d",
                engine.max_model_len, engine.runner.capacity_tokens, engine.runner.num_blocks,
                engine.runner.block_size, engine.scheduler.config.max_num_seqs)  # fmt: skip
    logger.info("compile: %s", llm.info.summary())
    logger.info("listening on http://%s:%d (API key %s)", server.host, server.port,
                "required" if server.api_key else "not required")  # fmt: skip


def serve_main(argv: list[str] | None = None) -> int:
    """Parse `argv`, build the LLM and serve until SIGINT/SIGTERM; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = config_from_args(args)
    except (OSError, ValueError, TypeError) as exc:
        logger.error("bad configuration: %s", exc)
        return 2
    from fxllm.runtime.gc_heap import startup_gc

    with startup_gc():  # the defaults again before the server takes requests
        from fxllm.llm import LLM
        from fxllm.serve.server import run_server

        llm = LLM(config.model.model, config=config, serving=True)
    group = getattr(llm.engine.runner, "group", None)
    if group is not None:  # tensor parallel: a dead rank takes the server down (drained, then exit)
        group.on_death = lambda reason: os.kill(os.getpid(), signal.SIGTERM)
    run_server(llm, config)
    return 0 if group is None or group.dead is None else 1
