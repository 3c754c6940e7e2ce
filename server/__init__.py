"""loramux: server package."""
