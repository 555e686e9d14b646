"""`fxllm bench serve`: a streaming load generator for a running OpenAI-compatible server."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

_WORDS = ["time", "person", "year", "way", "day", "thing", "man", "world", "life", "hand", "part", "child", "eye", "woman", "place", "work", "week", "case", "point", "government", "company", "number", "group", "problem", "fact", "river", "music", "garden", "window", "paper", "story", "light", "city"]  # fmt: skip


@dataclass
class RequestResult:
    """What one streamed request measured (seconds, relative to the benchmark start)."""

    start: float
    ok: bool = False
    error: str = ""
    ttft: float = math.nan
    e2e: float = math.nan
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0


def build_parser() -> argparse.ArgumentParser:
    """The command line of `fxllm bench serve`."""
    p = argparse.ArgumentParser(
        prog="fxllm bench serve", description="Load-test a running fxllm (or any OpenAI) server"
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    p.add_argument("--model", help="model name (default: the first of GET /v1/models)")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--num-requests", "-n", type=int, default=64)
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests/s, Poisson arrivals (default inf: all at once)")  # fmt: skip
    p.add_argument("--concurrency", type=int, help="at most this many requests in flight")
    p.add_argument("--input-len", type=int, default=32, help="words per synthetic prompt (~tokens)")
    p.add_argument("--output-len", type=int, default=64, help="max_tokens per request")
    p.add_argument("--prompt", help="use this prompt (numbered per request) instead of synthetic ones")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly --output-len tokens (default on)")  # fmt: skip
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--api-key", help="bearer token (else env FXLLM_API_KEY / OPENAI_API_KEY)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    p.add_argument("--plot", default="bench_serve.png", help="PNG path for the latency plot ('' = none)")
    p.add_argument("--json", dest="json_path", help="also write the results as JSON here")
    return p


def make_prompts(args: argparse.Namespace) -> list[str]:
    """Distinct prompts: `--prompt` numbered, or seeded random words."""
    rng = random.Random(args.seed)
    if args.prompt:
        return [f"{args.prompt} ({i})" for i in range(args.num_requests)]
    return [
        f"{i}: " + " ".join(rng.choice(_WORDS) for _ in range(args.input_len))
        for i in range(args.num_requests)
    ]


def _body(args: argparse.Namespace, model: str, prompt: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": args.output_len, "temperature": args.temperature,
                            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": args.ignore_eos}  # fmt: skip
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


async def _one(client: Any, url: str, body: dict[str, Any], t0: float) -> RequestResult:
    result = RequestResult(start=time.perf_counter() - t0)
    sent = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                result.error = (
                    f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:200]}"
                )
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = chunk["error"].get("message", "error")
                    return result
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    text = choice.get("text") or (choice.get("delta") or {}).get("content")
                    if not text:
                        continue
                    now = time.perf_counter()
                    if last is None:
                        result.ttft = now - sent
                    else:
                        result.itl.append(now - last)
                    last = now
        result.e2e = time.perf_counter() - sent
        result.ok = last is not None
        result.error = "" if result.ok else "no tokens received"
    except Exception as exc:  # network errors count as failed requests, not a crashed benchmark
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def run_benchmark(
    args: argparse.Namespace, model: str, prompts: list[str]
) -> tuple[list[RequestResult], float]:
    """Send every prompt at the arrival process asked for; returns the results and the wall time."""
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    rng = np.random.default_rng(args.seed)
    gate = asyncio.Semaphore(args.concurrency) if args.concurrency else None
    async with httpx.AsyncClient(
        base_url=args.url, headers=headers, limits=limits, timeout=args.timeout
    ) as client:
        t0 = time.perf_counter()

        async def limited(prompt: str) -> RequestResult:
            if gate is None:
                return await _one(client, path, _body(args, model, prompt), t0)
            async with gate:
                return await _one(client, path, _body(args, model, prompt), t0)

        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(limited(prompt)))
            if math.isfinite(args.request_rate) and args.request_rate > 0:
                await asyncio.sleep(float(rng.exponential(1.0 / args.request_rate)))
        results = list(await asyncio.gather(*tasks))
        return results, time.perf_counter() - t0


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    """Throughput and latency percentiles (milliseconds) of the successful requests."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    summary: dict[str, Any] = {
        "requests": len(results), "successful": len(ok), "failed": len(results) - len(ok),
        "duration_s": duration, "request_throughput": len(ok) / duration if duration else 0.0,
        "output_token_throughput": out_tokens / duration if duration else 0.0,
        "total_token_throughput": (out_tokens + sum(r.prompt_tokens for r in ok)) / duration if duration else 0.0,
    }  # fmt: skip
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": tpot,
        "itl": [g for r in ok for g in r.itl],
        "e2e": [r.e2e for r in ok],
    }
    for name, values in series.items():
        arr = np.asarray(values, dtype=float) * 1000
        for stat, fn in (("mean", np.mean), ("p50", lambda a: np.percentile(a, 50)),
                         ("p90", lambda a: np.percentile(a, 90)), ("p99", lambda a: np.percentile(a, 99))):  # fmt: skip
            summary[f"{name}_{stat}_ms"] = float(fn(arr)) if arr.size else math.nan
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a fixed-width text table."""
    lines = [
        f"{'requests (ok / failed)':<28}{summary['successful']} / {summary['failed']}",
        f"{'duration (s)':<28}{summary['duration_s']:.2f}",
        f"{'request throughput (req/s)':<28}{summary['request_throughput']:.2f}",
        f"{'output tokens/s':<28}{summary['output_token_throughput']:.1f}",
        f"{'total tokens/s':<28}{summary['total_token_throughput']:.1f}",
        "",
        f"{'latency (ms)':<14}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}",
    ]
    for name, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e", "E2E")):
        values = [summary[f"{name}_{s}_ms"] for s in ("mean", "p50", "p90", "p99")]
        lines.append(f"{label:<14}" + "".join(f"{v:>10.1f}" for v in values))
    return "\n".join(lines) + "\n"


def write_plot(results: list[RequestResult], path: str) -> bool:
    """A PNG of TTFT / ITL distributions and E2E over time; False (logged) if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed; skipping the plot (pip install matplotlib)")
        return False
    ok = [r for r in results if r.ok]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    axes[0][0].hist([r.ttft * 1000 for r in ok], bins=30)
    axes[0][0].set(title="time to first token", xlabel="ms", ylabel="requests")
    axes[0][1].hist([g * 1000 for r in ok for g in r.itl], bins=40)
    axes[0][1].set(title="inter-token latency", xlabel="ms", ylabel="gaps")
    axes[1][0].scatter([r.start for r in ok], [r.e2e for r in ok], s=8)
    axes[1][0].set(title="end-to-end latency by arrival", xlabel="arrival (s)", ylabel="e2e (s)")
    finish = sorted(r.start + r.e2e for r in ok)
    axes[1][1].plot(finish, range(1, len(finish) + 1))
    axes[1][1].set(title="requests completed", xlabel="time (s)", ylabel="requests")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    logger.info("wrote %s", path)
    return True


def _resolve_model(args: argparse.Namespace) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    resp = httpx.get(f"{args.url}/v1/models", headers=headers, timeout=30)
    resp.raise_for_status()
    return str(resp.json()["data"][0]["id"])


def bench_serve_main(argv: list[str] | None = None) -> int:
    """Run the load test; prints the table, writes the plot (and JSON); 0 if every request succeeded."""
    import os

    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args.api_key = args.api_key or os.environ.get("FXLLM_API_KEY") or os.environ.get("OPENAI_API_KEY")
    try:
        model = args.model or _resolve_model(args)
    except Exception as exc:
        logger.error("cannot reach %s/v1/models: %s", args.url, exc)
        return 2
    prompts = make_prompts(args)
    logger.info("%d %s requests to %s (model %s), rate %s/s, concurrency %s, max_tokens %d", len(prompts),
                args.endpoint, args.url, model, args.request_rate, args.concurrency or "unlimited", args.output_len)  # fmt: skip
    results, duration = asyncio.run(run_benchmark(args, model, prompts))
    for r in results:
        if not r.ok:
            logger.warning("request failed: %s", r.error)
    summary = summarize(results, duration)
    sys.stdout.write(format_table(summary))
    if args.plot:
        write_plot(results, args.plot)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"summary": summary, "requests": [asdict(r) for r in results]}, f, indent=1)
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(bench_serve_main())
