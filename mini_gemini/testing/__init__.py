"""Tiny models built from the real classes with small configs, in the official layout (tests, experiments)."""
