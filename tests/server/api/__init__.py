"""Tests of server/api: routes, auth, limits, metrics, the CLI, against a fake engine and the real one."""
