"""Canonical fxllm custom ops: schema, reference implementation, fake implementation."""
