"""The worker's command line: MODEL and fxllm's config flags, plus Dynamo's own worker flags."""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass
from pathlib import Path

from fxllm.compiler.cache import cache_root
from fxllm.config import FxllmConfig, load_config
from fxllm.dynamo.model_folder import EXPORT_VERSION, has_frontend_files, needs_export
from fxllm.models.embedded import EMBEDDED_ALIASES, embedded_gguf_path


@dataclass
class WorkerOptions:
    """Dynamo-side options of one worker (not fxllm config: they name Dynamo's runtime, not the engine)."""

    model_path: Path  # the folder the frontend reads the tokenizer, chat template and config from
    export_model_path: bool  # write model_path from MODEL before serving (embedded model, GGUF)
    served_model_name: str
    namespace: str = "dynamo"
    component: str = "fxllm"
    endpoint: str = "generate"
    endpoint_types: str = "chat,completions"
    discovery_backend: str = "file"
    request_plane: str = "tcp"
    event_plane: str | None = "zmq"
    enable_kv_routing: bool = True


def build_parser() -> argparse.ArgumentParser:
    """`python -m fxllm.dynamo MODEL [--set KEY=VALUE ...] [Dynamo worker flags]`."""
    p = argparse.ArgumentParser(
        prog="python -m fxllm.dynamo", description="An NVIDIA Dynamo worker over fxllm's engine"
    )
    p.add_argument("model", help="smollm2 (embedded), an HF folder or a .gguf file")
    p.add_argument("--config", "-c", help="fxllm's config.yml")
    p.add_argument("--set", "-o", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="fxllm config override, e.g. --set scheduler.max_num_seqs=32 (repeatable)")  # fmt: skip
    p.add_argument("--tp", type=int, help="tensor parallel ranks (parallel.tensor_parallel_size)")
    p.add_argument("--model-path", help="the HF folder (tokenizer.json, tokenizer_config.json with the chat "
                   "template, config.json) the frontend reads; default: MODEL if it is such a folder, else a "
                   "folder fxllm writes under its cache for the embedded model or a GGUF")  # fmt: skip
    p.add_argument("--served-model-name", help="the model name clients send (default: MODEL)")
    p.add_argument("--namespace", default="dynamo")
    p.add_argument("--component", default="fxllm")
    p.add_argument("--endpoint", default="generate")
    p.add_argument("--endpoint-types", default="chat,completions")
    p.add_argument("--discovery-backend", default="file", choices=["file", "etcd", "kubernetes", "mem"],
                   help="file: no etcd; the frontend and workers share $DYN_FILE_KV")  # fmt: skip
    p.add_argument("--request-plane", default="tcp", choices=["tcp", "nats"])
    p.add_argument("--event-plane", default="zmq", choices=["zmq", "nats"])
    p.add_argument("--disable-kv-routing", action="store_true",
                   help="publish no KV events or load snapshots (round-robin deployments)")  # fmt: skip
    return p


def exported_folder_for(model: str, config: FxllmConfig) -> Path:
    """Where the worker writes the frontend's folder for an embedded or GGUF MODEL (one per file version)."""
    source = embedded_gguf_path() if model.strip().lower() in EMBEDDED_ALIASES else Path(model).expanduser()
    stat = source.stat()
    identity = f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:v{EXPORT_VERSION}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return cache_root(config.compile.cache_dir) / "hf-folders" / f"{source.stem}-{key}"


def parse(argv: list[str] | None) -> tuple[FxllmConfig, WorkerOptions]:
    """fxllm's config tree and the worker options; ValueError naming a bad flag."""
    args = build_parser().parse_args(argv)
    config = load_config(args.config, args.overrides)
    config.model.model = args.model
    if args.tp is not None:
        if args.tp < 1:
            raise ValueError(f"--tp must be >= 1, got {args.tp}")
        config.parallel.tensor_parallel_size = args.tp
    if args.model_path:
        model_path, export = Path(args.model_path).expanduser(), False
        if not has_frontend_files(model_path):
            raise ValueError(f"--model-path {model_path} lacks tokenizer.json, tokenizer_config.json or "
                             "config.json; write them with `fxllm export-hf-tokenizer DIR MODEL`")  # fmt: skip
    elif needs_export(args.model):
        model_path = exported_folder_for(args.model, config)
        export = not has_frontend_files(model_path)
    elif Path(args.model).expanduser().is_dir():
        model_path, export = Path(args.model).expanduser(), False
        if not has_frontend_files(model_path):
            raise ValueError(f"{model_path} has no tokenizer.json + tokenizer_config.json: Dynamo's frontend "
                             "tokenizes; pass --model-path to a folder that has them")  # fmt: skip
    else:
        raise ValueError(f"MODEL {args.model!r}: a Dynamo worker needs a model with a tokenizer (smollm2, an "
                         "HF folder or a .gguf file); presets have none")  # fmt: skip
    options = WorkerOptions(
        model_path=model_path.absolute(),
        export_model_path=export,
        served_model_name=args.served_model_name or args.model,
        namespace=args.namespace,
        component=args.component,
        endpoint=args.endpoint,
        endpoint_types=args.endpoint_types,
        discovery_backend=args.discovery_backend,
        request_plane=args.request_plane,
        event_plane=args.event_plane,
        enable_kv_routing=not args.disable_kv_routing,
    )
    return config, options
