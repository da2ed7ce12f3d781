"""Serving: the OpenAI-compatible API and web UI (api.py) and the human-feedback store (feedback.py)."""
