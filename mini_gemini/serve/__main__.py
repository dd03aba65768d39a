"""`python -m mini_gemini.serve --model M --port P`: the OpenAI-compatible server alone (see cli.py)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
