"""In-process benchmarks: `python -m server.bench` (the engine at batch sizes and adapter mixes vs
its roofline floor and the Hugging Face PEFT baseline of `peft_baseline`). Commands that print a
table and write JSON; never tests."""
