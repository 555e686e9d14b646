"""OpenAI-compatible server and the `fxllm` command line."""
