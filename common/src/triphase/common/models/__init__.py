"""Model files: finding and checking a model (files), its tokenizer and chat template (tokenizer), a
vision tower's settings (vision). Read by the router and the workers alike, so they agree."""
