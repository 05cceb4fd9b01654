"""Model families and the loaders that turn files on disk into weights, configs and tokenizers."""
