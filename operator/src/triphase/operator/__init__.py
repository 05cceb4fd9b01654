"""triphase operator (see the issues: it lands after the engine)."""
