"""Structured units (heads, FFN neurons, channels): find them, cost them, cut them out."""
