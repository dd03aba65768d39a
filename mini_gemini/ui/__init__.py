"""The Gradio app (the top-level app.py is its Spaces entry point)."""
