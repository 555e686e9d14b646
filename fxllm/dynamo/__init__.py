"""fxllm as an NVIDIA Dynamo backend: `python -m fxllm.dynamo MODEL` starts a worker (needs `fxllm[dynamo]`).

Importing this package does not import Dynamo; `fxllm.dynamo.engine` does.
"""
