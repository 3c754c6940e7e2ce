"""The engine: requests in, token deltas out.

Core objects, plain Python with no torch anywhere in their imports: `config` (one frozen dataclass
per concern), `request` (a request and its status), `sampling_params`, `block_manager` (KV blocks),
`scheduler` (what runs each step), `outputs`, and `client` (the protocol the HTTP layer talks to).
Torch side: `runner` (the only place requests become tensors), `sampler`, `cpu_decode_loop` (the
CPU all-layers decode executor), `llm_engine` (step = schedule -> execute -> update), `async_engine`
and `engine_thread` (the step loop on its own thread, streams for asyncio), and `builder` (wiring).
This file imports nothing, so importing a core object never pulls in torch.
"""
