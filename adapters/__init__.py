"""loramux: adapters package."""
