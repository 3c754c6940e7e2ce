"""The LoRA trainer behind `loramux train`: `data` reads and tokenizes JSONL examples (no torch),
`trainer` trains PEFT-format adapters on the base model and writes or uploads them."""
