"""`python -m mini_gemini.tiny`: kept as an entry point; the builders live in `mini_gemini.testing`."""
import sys

from .testing.tiny import build_tiny, main, tiny_config  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
