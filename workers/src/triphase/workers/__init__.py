"""triphase workers: the torch engine and the gRPC worker around it."""
