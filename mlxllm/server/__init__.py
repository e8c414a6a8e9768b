"""``mlxllm serve``: an OpenAI-compatible HTTP server on the serving engine (``app.py``: the
routes; ``openai.py``: the API's fields and objects)."""
