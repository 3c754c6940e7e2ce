"""loramux: server/model package."""
