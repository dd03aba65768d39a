"""The model behind an OpenAI-compatible API: `/v1/chat/completions` and `/v1/models`.

- `protocol.py`: request validation, response and chunk objects, errors in OpenAI's format (no model, no HTTP);
- `conversation.py`: a request's messages as the engine's history turns and the message to answer;
- `openai_api.py`: the FastAPI routes over an `Engine` (streaming, limits, disconnects), mounted by the app;
- `cli.py`: `mgm-serve` / `python -m mini_gemini.serve`, the endpoint alone (no Gradio page).
"""
