"""`python -m fxllm.dynamo MODEL [--set KEY=VALUE ...] [Dynamo worker flags]`: one Dynamo worker."""

from __future__ import annotations

import importlib.util
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    """Run one worker until Dynamo shuts it down (SIGINT/SIGTERM); returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if importlib.util.find_spec("dynamo") is None or importlib.util.find_spec("dynamo.common") is None:
        logging.getLogger("fxllm.dynamo").error(
            "NVIDIA Dynamo is not installed: `pip install -e '.[dynamo]' && pip install --no-deps "
            "ai-dynamo==1.6.1` (docs/scale-out.md says why --no-deps)"
        )
        return 2
    from dynamo.common.backend.run import run

    from fxllm.dynamo.engine import FxllmDynamoEngine

    run(FxllmDynamoEngine, sys.argv[1:] if argv is None else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
