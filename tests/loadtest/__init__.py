"""Tests of loadtest/: the external HTTP load-test client, against a stub server and a real one."""
