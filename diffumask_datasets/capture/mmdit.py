"""Placeholder: filled in by the MMDiT capture."""

SUPPORTED: tuple = ()
