"""loramux: server/api package."""
