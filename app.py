"""Hugging Face Spaces entry point: `python app.py [--model M] [--sdxl S|none] ...` (`--help` lists all).

The app itself lives in `mini_gemini/ui/`; this file only says at once that it is starting (importing
torch, transformers and Gradio takes a while) and hands over.
"""
import sys

if __name__ == "__main__":
    if "-h" not in sys.argv and "--help" not in sys.argv:
        print("Mini-Gemini Studio is starting (loading libraries)…", flush=True)
    from mini_gemini.ui.app import main

    main()
