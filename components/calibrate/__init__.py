"""The calibrate component."""
