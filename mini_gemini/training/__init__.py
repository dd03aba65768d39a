"""Training (stage 1 / stage 2, as in the paper) and the synthetic small-digit task of the demo model."""
