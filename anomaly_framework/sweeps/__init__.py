"""Sweeps: many runs (models × categories × seeds) and their summary tables."""
