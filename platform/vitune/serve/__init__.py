"""Serving: the OpenAI wire format and request conversion (openai), the batching engine (engine)."""
