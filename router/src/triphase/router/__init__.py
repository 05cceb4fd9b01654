"""triphase router: the OpenAI-compatible front end that places requests on prefill and decode
workers, orchestrates the KV hand-off between them and streams tokens back."""
