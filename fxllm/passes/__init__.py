"""Graph passes: the pass API and one pass a file."""
