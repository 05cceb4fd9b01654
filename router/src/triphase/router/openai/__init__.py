"""OpenAI protocol models and the HTTP routes (the only package that knows the web framework)."""
