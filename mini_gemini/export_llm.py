"""`python -m mini_gemini.export_llm CHECKPOINT OUT`: the LLM of an MGM checkpoint, laid out for vLLM (see
`mini_gemini.modeling.export_llm`)."""
import sys

from .modeling.export_llm import export_llm, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
