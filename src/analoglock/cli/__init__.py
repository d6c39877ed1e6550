"""Thin Hydra entry points, one per command."""
