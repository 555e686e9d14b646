"""Implementations of the canonical ops, chosen per op by device capability and config."""
