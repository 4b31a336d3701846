"""The allocate component."""
