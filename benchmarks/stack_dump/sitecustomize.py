"""Diagnosis of stalled multi-process GPU runs: full Python stacks of every thread, written to a file.

Put this folder first on PYTHONPATH and set FXLLM_STACK_DUMP_S=<seconds> (and optionally
FXLLM_STACK_DUMP_DIR, default /tmp/stack_dumps): every Python process started with that environment
(the benchmark, its engine child, the tensor-parallel workers it spawns) writes the complete stacks of all
its threads after that many seconds, and again every as many seconds, to <dir>/<pid>.txt. Unlike
faulthandler this prints every frame (a deep recursion's caller is at the bottom), and the files
survive a `timeout` kill. Inductor's compile-worker processes skip it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback


def _dump_forever(seconds: float, path: str) -> None:
    while True:
        time.sleep(seconds)
        frames = sys._current_frames()
        with open(path, "a") as f:
            f.write(f"==== {time.strftime('%H:%M:%S')} argv {sys.argv[:4]}\n")
            for ident, frame in frames.items():
                if ident == threading.get_ident():
                    continue
                f.write(f"-- thread {ident}\n")
                stack = traceback.format_stack(frame, limit=None)
                # A deep recursion: keep its innermost and outermost frames, say how many were left out.
                if len(stack) > 400:
                    stack = [*stack[:300], f"  ... {len(stack) - 360} frames ...\n", *stack[-60:]]
                f.write("".join(stack))


_seconds = os.environ.get("FXLLM_STACK_DUMP_S")
if _seconds and "compile_worker" not in " ".join(sys.argv):
    _dir = os.environ.get("FXLLM_STACK_DUMP_DIR", "/tmp/stack_dumps")
    os.makedirs(_dir, exist_ok=True)
    threading.Thread(
        target=_dump_forever, args=(float(_seconds), f"{_dir}/{os.getpid()}.txt"), daemon=True
    ).start()
