"""Conversations over a loaded model: templates and tokenisation, sessions, streaming, caches, image turns."""
