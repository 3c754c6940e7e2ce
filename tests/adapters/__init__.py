"""Tests of adapters/: PEFT parsing, validation, store, registry, slot pool, PEFT parity."""
