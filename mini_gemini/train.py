"""`python -m mini_gemini.train`: kept as an entry point; training lives in `mini_gemini.training`."""
import sys

from .training.train import cli, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(cli())
