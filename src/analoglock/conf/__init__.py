"""Hydra configs shipped inside the package (found through pkg://analoglock.conf)."""
