"""Tests of server/train and the shipped demo adapters: trainer, data CLI, engine vs PEFT greedy tokens."""
