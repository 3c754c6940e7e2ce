"""loramux: loadtest package."""
