"""`python -m fxllm.serve [MODEL] --config config.yml --host --port --api-key ...`."""

from __future__ import annotations

from fxllm.runtime.gc_heap import startup_gc

with startup_gc():  # imports torch and the server stack; serve_main's own covers the build
    from fxllm.serve.serve_cli import serve_main

if __name__ == "__main__":
    raise SystemExit(serve_main())
