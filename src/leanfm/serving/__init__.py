"""Serving: launching existing OpenAI-compatible servers on a prepared model, and load-testing them."""
