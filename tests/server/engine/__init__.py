"""Tests of server/engine: scheduler and block manager (no model), engine, sampler, the in-process bench."""
