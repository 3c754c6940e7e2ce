"""Tests of server/: api (HTTP edge), engine (scheduler, engine, sampler, bench), model (math, loaders, fast paths), train."""
