"""camelid inside other serving systems (optional dependencies, imported on use)."""
