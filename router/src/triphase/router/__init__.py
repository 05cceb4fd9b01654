"""triphase router (see the issues: it lands after the engine)."""
