"""The `fxllm` command line: compile, generate, chat, bench, eval-ppl, cache, export-hf-tokenizer, serve."""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger("fxllm")


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="config.yml to load")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set scheduler.max_num_seqs=32")  # fmt: skip
    parser.add_argument("--backend", help="compile backend: inductor or eager")
    parser.add_argument("--device", help="cpu, cuda or auto")
    parser.add_argument("--dtype", help="auto, float32 (fp32), bfloat16 (bf16) or float16 (fp16)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _load(args: argparse.Namespace, model: str | None) -> object:
    from fxllm.config import load_config

    overrides = list(args.set)
    for key, value in (
        ("compile.backend", args.backend),
        ("model.device", args.device),
        ("model.dtype", args.dtype),
    ):
        if value:
            overrides.append(f"{key}={value}")
    if model:
        overrides.append(f"model.model={model}")
    return load_config(args.config, overrides)


def cmd_compile(args: argparse.Namespace) -> int:
    """Capture, run the passes and compile MODEL; --explain prints the pass table and op counts."""
    from fxllm.compiler.api import compile_model
    from fxllm.models import load_model
    from fxllm.runtime.engine import resolve_device_dtype

    config = _load(args, args.model)
    device, dtype = resolve_device_dtype(config.model.device, config.model.dtype)  # type: ignore[attr-defined]
    if config.parallel.tensor_parallel_size > 1:  # type: ignore[attr-defined]
        from fxllm.runtime.distributed.rank_model import explain_rank_model

        model = explain_rank_model(config, device, dtype)  # type: ignore[arg-type]
    else:
        name, layers = config.model.model, config.model.num_layers  # type: ignore[attr-defined]
        model = load_model(name, device=device, dtype=dtype, num_layers=layers).model
        from fxllm.runtime.speculative.eagle3 import with_hidden_state_outputs

        # speculative.method=eagle3: the pass table shows expose_hidden_states returning the head's layers
        config = with_hidden_state_outputs(config, model.config)  # type: ignore[arg-type]
    compiled = compile_model(model, backend=config.compile.backend, passes=config.compile.passes,  # type: ignore[attr-defined]
                             op_backends=config.compile.op_backends,  # type: ignore[attr-defined]
                             quantization=config.quantization)  # type: ignore[attr-defined]  # fmt: skip
    if args.explain:
        print(compiled.report())
    else:
        print(f"compiled {config.model.model}: {compiled.fxllm_op_counts()}")  # type: ignore[attr-defined]
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate a completion for one prompt."""
    from fxllm.llm import LLM
    from fxllm.runtime.sampling_params import SamplingParams

    llm = LLM(config=_load(args, args.model))  # type: ignore[arg-type]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    if args.chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
    else:
        out = llm.generate(args.prompt, params)[0]
    print(out.outputs[0].text)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """An interactive chat on the terminal (empty line or EOF quits)."""
    from fxllm.llm import LLM
    from fxllm.runtime.sampling_params import SamplingParams

    llm = LLM(config=_load(args, args.model))  # type: ignore[arg-type]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    for line in sys.stdin:
        text = line.strip()
        if not text:
            break
        messages.append({"role": "user", "content": text})
        reply = llm.chat(messages, params)[0].outputs[0].text
        messages.append({"role": "assistant", "content": reply})
        print(reply, flush=True)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Offline benchmark (fxllm vs HF eager), or `bench serve` against a running server."""
    if args.what == "serve":
        from fxllm.serve.bench_serve import bench_serve_main

        return bench_serve_main(args.rest)
    from fxllm.serve.bench_offline import format_results, results_json, run_offline_bench

    if args.speculative:  # METHOD[:K[:MODEL]], e.g. ngram:4 or eagle3:4:HEAD; other speculative.* keys: --set
        method, _, rest = args.speculative.partition(":")
        k, _, drafter = rest.partition(":")
        spec = [f"speculative.method={method}"] + ([f"speculative.num_speculative_tokens={k}"] if k else [])
        spec += [f"speculative.model={drafter}"] if drafter else []
        args.set = [*spec, *args.set]
    config = _load(args, args.model)
    rows = run_offline_bench(config, input_len=args.input_len, output_len=args.output_len,  # type: ignore[arg-type]
                             concurrency=args.concurrency, skip_hf=args.skip_hf)  # fmt: skip
    print(format_results(rows))
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(results_json(rows))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """`fxllm cache list` / `fxllm cache clear`: the compile cache (post-pass graphs, Inductor, Triton)."""
    from fxllm.compiler.cache import cache_root, clear, describe

    configured = args.dir
    if configured is None and (args.config or args.set):
        configured = _load(args, None).compile.cache_dir  # type: ignore[attr-defined]
    root = cache_root(configured)
    if args.action == "list":
        print(describe(root))
    else:
        removed = clear(root, graphs_only=args.graphs_only)
        print(f"removed {', '.join(map(str, removed))}" if removed else f"nothing to remove under {root}")
    return 0


def cmd_export_hf_tokenizer(args: argparse.Namespace) -> int:
    """Write MODEL's tokenizer, chat template and config as an HF folder (what Dynamo's frontend reads)."""
    from pathlib import Path

    from fxllm.dynamo.model_folder import export_model_folder

    print(export_model_folder(args.model, Path(args.dir)))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Start the OpenAI-compatible server (see fxllm.serve.server)."""
    from fxllm.serve.server import serve_main

    return serve_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="fxllm", description="PyTorch-native LLM compiler and server")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compile", help="capture + passes + compile a model")
    p.add_argument("model", nargs="?", default=None, help="smollm2, a preset, a HF folder or a .gguf file")
    p.add_argument("--explain", action="store_true", help="print the pass table and op counts")
    _config_args(p)
    p.set_defaults(fn=cmd_compile)

    for name, fn in (("generate", cmd_generate), ("chat", cmd_chat)):
        p = sub.add_parser(name, help=f"{name} on the command line")
        if name == "generate":
            p.add_argument("prompt")
            p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
        else:
            p.add_argument("--system", help="system prompt")
        p.add_argument("--model", default=None)
        p.add_argument("--max-tokens", type=int, default=64)
        p.add_argument("--temperature", type=float, default=0.0)
        p.add_argument("--seed", type=int, default=None)
        _config_args(p)
        p.set_defaults(fn=fn)

    p = sub.add_parser("bench", help="offline benchmark vs HF eager, or `bench serve ...` against a server")
    p.add_argument("what", nargs="?", default="offline", choices=["offline", "serve"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of `bench serve`")
    p.add_argument("--model", default=None)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--skip-hf", action="store_true", help="do not run the HF eager baseline")
    p.add_argument("--speculative", default=None, metavar="METHOD[:K[:MODEL]]",
                   help="also run with speculative decoding (ngram, draft_model, self_draft, eagle3), e.g. ngram:4 "
                        "or eagle3:4:PATH (draft_model / eagle3: MODEL is speculative.model, the drafter)")  # fmt: skip
    p.add_argument("--json", help="also write the results here")
    _config_args(p)
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("cache", help="list or clear the compile cache (~/.cache/fxllm or $FXLLM_CACHE_DIR)")
    p.add_argument("action", choices=["list", "clear"])
    p.add_argument("--dir", default=None, help="the cache root (default: compile.cache_dir, $FXLLM_CACHE_DIR, "
                   "~/.cache/fxllm)")  # fmt: skip
    p.add_argument(
        "--graphs-only",
        action="store_true",
        help="clear: only the post-pass graphs (keep Inductor's, Triton's and the C++ kernels' caches)",
    )
    _config_args(p)
    p.set_defaults(fn=cmd_cache)

    from fxllm.serve.eval_ppl import add_eval_ppl_parser

    add_eval_ppl_parser(sub, _config_args, _load)

    p = sub.add_parser("export-hf-tokenizer", help="write MODEL's tokenizer.json, tokenizer_config.json (chat "
                       "template) and config.json into DIR, for Dynamo's frontend (docs/scale-out.md)")  # fmt: skip
    p.add_argument("dir")
    p.add_argument("model", nargs="?", default="smollm2", help="smollm2 (default), a .gguf or an HF folder")
    p.set_defaults(fn=cmd_export_hf_tokenizer)

    p = sub.add_parser("serve", help="OpenAI-compatible server (fxllm serve --help)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fxllm` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "serve":  # serve owns its flags (argparse REMAINDER drops leading --options)
        from fxllm.runtime.gc_heap import startup_gc

        with startup_gc():  # the server's imports (torch, fastapi, ...); serve_main's own covers the build
            from fxllm.serve.server import serve_main

        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.fn(args))
    except (ValueError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
