"""Tests of server/model: Hugging Face parity, loaders, tokenizers, the CPU fast paths."""
