"""loramux: kernels package."""
