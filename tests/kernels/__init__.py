"""Tests of kernels/: every LoRA backend and C++ op against kernels/reference.py and the torch paths."""
