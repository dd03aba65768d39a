"""Hugging Face Spaces entry point: `python app.py [--model M] [--sdxl S|none] ...` (`--help` lists all).

The app itself lives in `mini_gemini/ui/`; this file only starts the progress lines on stderr at once
(importing Gradio, torch and transformers takes a while, and the terminal should say so) and hands over.
"""
import sys

if __name__ == "__main__":
    if "-h" not in sys.argv and "--help" not in sys.argv:
        from mini_gemini.ui.console import log_to_console  # imports nothing heavy

        log_to_console().info("Mini-Gemini Studio is starting: importing Gradio…")
    from mini_gemini.ui.app import main

    main()
