"""Capture a Hugging Face model into one FX graph, run the pass pipeline, compile it."""
