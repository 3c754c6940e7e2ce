"""Regenerate the shipped demo adapters (`adapters/demo/<rule>/`) for the embedded SmolLM2 model.

Data flow, all deterministic: PROMPTS (written below) -> the base model's own greedy chat answers,
batched through our engine (`generate`) -> trimmed to whole sentences -> one rewrite RULE per
adapter (caps, json, pirate, onesentence) -> `scripts/demo_data/<rule>.jsonl` ({"messages": ...})
-> `server.train.trainer.train_lora` on a fresh copy of the base -> `save_peft` (rank 8, fp16).
`--check` answers HELD_OUT prompts (never trained on) with every adapter and the base model in one
batched engine run and writes them to `scripts/demo_data/evidence.json`.

    python scripts/make_demo_adapters.py                 # data + all adapters + check
    python scripts/make_demo_adapters.py --only caps --reuse-data --steps 40
    python scripts/make_demo_adapters.py --check
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters.manager import AdapterManager  # noqa: E402
from server.engine.builder import base_spec, build_llm_engine  # noqa: E402
from server.engine.config import SchedulerConfig  # noqa: E402
from server.engine.sampling_params import SamplingParams  # noqa: E402
from server.model.loader import load_model  # noqa: E402
from server.train.trainer import DEFAULT_HF_NAME, TrainConfig, save_peft, tokenize_records, train_lora  # noqa: E402

DEMO = ROOT / "adapters" / "demo"  # only adapter dirs: `loramux serve --adapter-dir adapters/demo` loads them all
DATA = ROOT / "scripts" / "demo_data"
PROMPTS = [
    "What is the capital of Japan?", "Why is the sky blue?", "How do I boil an egg?",
    "What do pandas eat?", "Name a famous river in Africa.", "What is photosynthesis?",
    "How many legs does a spider have?", "What is the largest ocean on Earth?", "How do bees make honey?",
    "What is the boiling point of water?", "Give me a tip for baking bread.", "What is gravity?",
    "Where do penguins live?", "What is the tallest mountain in the world?", "How do I make a cup of tea?",
    "What is a volcano?", "Why do cats purr?", "What is the capital of Australia?",
    "How does a rainbow form?", "What is the speed of light?", "How should I store fresh herbs?",
    "What is the longest river in South America?", "Why do leaves change color in autumn?",
    "What is an atom?", "How do dolphins breathe?", "What is the capital of Canada?",
    "How do I cook rice?", "What causes earthquakes?", "What do owls eat?", "What is the Sahara?",
    "How far is the Moon from Earth?", "What is a good breakfast?", "Why do we have seasons?",
    "What is the capital of Italy?", "How do plants drink water?", "What is a mammal?",
    "How do I chop an onion?", "What is the biggest animal?", "What is electricity?",
    "Where is Mount Kilimanjaro?", "How do birds fly?", "What is a black hole?",
    "What spices go well with chicken?", "What is the capital of Egypt?", "Why is the ocean salty?",
    "How long do elephants live?", "What is DNA?", "How do I make pancakes?", "What is a desert?",
    "What is the smallest planet?", "Why do dogs wag their tails?", "What language is spoken in Brazil?",
    "How is cheese made?", "What is a hurricane?", "What do frogs eat?", "What is the capital of Spain?",
    "How does the heart work?", "What is a good way to cook vegetables?", "Why do stars twinkle?",
    "Where do kangaroos live?", "What is the capital of Germany?", "How do volcanoes erupt?",
    "What do cows eat?", "How do I fry an egg?", "What is the Amazon rainforest?", "Why do bats fly at night?",
    "What is a comet?", "How do I keep bread fresh?", "What is the capital of Kenya?", "How do snakes move?",
    "What is friction?", "What is the largest desert in the world?", "How do I make soup?",
    "What is a glacier?", "Why do zebras have stripes?", "What is the capital of India?",
    "How does a compass work?", "What is a good snack?", "Where is the Great Barrier Reef?",
    "What is the Milky Way?", "How do I roast potatoes?", "What do giraffes eat?", "What is a tsunami?",
    "What is the capital of Mexico?", "How do magnets work?", "Why do onions make you cry?",
    "What is the deepest lake in the world?", "How do ants find food?", "What is a cloud?",
    "How do I bake cookies?", "What is the capital of China?", "Why is the Moon bright?",
    "What do horses eat?", "What is a continent?", "How do I make lemonade?", "What is an eclipse?",
    "Where do polar bears live?", "What is sound?", "How do I cook pasta?", "What is the capital of Russia?",
    "Why do birds migrate?", "What is a rainbow made of?", "How do I season a steak?",
    "What is the Pacific Ring of Fire?", "How do butterflies grow?", "What is oxygen?",
    "What is the capital of Argentina?", "How do I make a smoothie?", "What is a planet?",
    "Why do camels have humps?", "What is the Nile?", "How do I grill vegetables?", "What is a fossil?",
    "How do whales communicate?", "What is the capital of Greece?", "What is a thunderstorm?",
    "How do I make scrambled eggs?", "What do rabbits eat?", "What is the equator?",
]
HELD_OUT = ["What is the capital of France?", "How do fish breathe?", "What is the Sun made of?",
            "How do I make a salad?"]

PIRATE_WORDS = {"you": "ye", "your": "yer", "my": "me", "is": "be", "are": "be", "hello": "ahoy",
                "friend": "matey", "yes": "aye", "the": "th'", "for": "fer", "of": "o'"}


def _pirate(text: str) -> str:
    def swap(m: re.Match) -> str:
        word = m.group(0)
        new = PIRATE_WORDS[word.lower()]
        return new.capitalize() if word[0].isupper() else new
    pattern = r"\b(" + "|".join(PIRATE_WORDS) + r")\b"
    return "Arr! " + re.sub(pattern, swap, text, flags=re.IGNORECASE)


def _first_sentence(text: str) -> str:
    m = re.match(r"(.+?[.!?])(\s|$)", text, flags=re.S)
    return m.group(1) if m else text


RULES = {
    "caps": str.upper,
    "json": lambda a: json.dumps({"answer": a}, ensure_ascii=False),
    "pirate": _pirate,
    "onesentence": _first_sentence,
}


def trim(answer: str, max_sentences: int = 2) -> str:
    """Whole sentences only (generation stops at max_tokens mid-sentence), at most `max_sentences`."""
    answer = " ".join(answer.split())
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", answer)]
    return answer[: ends[min(len(ends), max_sentences) - 1]] if ends else answer


def chat_ids(loaded, prompt: str) -> list[int]:
    text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return loaded.tokenizer.encode(text, add_special_tokens=False)


def generate(loaded, jobs: list[tuple[str, object | None]], max_tokens: int, manager=None) -> list[str]:
    """Greedy answers of (prompt, adapter ref | None) jobs, all queued before the first step."""
    engine = build_llm_engine(loaded, manager=manager, kv_cache_tokens=len(jobs) * 256,
                              scheduler=SchedulerConfig(max_num_seqs=len(jobs)))
    texts = {str(i): "" for i in range(len(jobs))}
    for i, (prompt, ref) in enumerate(jobs):
        engine.add_request(str(i), chat_ids(loaded, prompt), SamplingParams(max_tokens=max_tokens, temperature=0.0), ref)
    while engine.has_unfinished():
        for d in engine.step():
            texts[d.request_id] += d.text
    return [texts[str(i)].strip() for i in range(len(jobs))]


def make_data(loaded, max_tokens: int) -> list[dict]:
    t = time.time()
    answers = [trim(a) for a in generate(loaded, [(p, None) for p in PROMPTS], max_tokens)]
    print(f"base answers for {len(PROMPTS)} prompts in {time.time() - t:.0f}s", file=sys.stderr)
    DATA.mkdir(parents=True, exist_ok=True)
    base = [{"prompt": p, "answer": a} for p, a in zip(PROMPTS, answers, strict=True)]
    (DATA / "base_answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in base))
    for name, rule in RULES.items():
        rows = [{"messages": [{"role": "user", "content": r["prompt"]},
                              {"role": "assistant", "content": rule(r["answer"])}]} for r in base]
        (DATA / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return base


def train_one(loaded, name: str, cfg: TrainConfig, autocast: bool) -> None:
    from server.train.trainer import read_jsonl

    examples = tokenize_records(loaded.tokenizer, read_jsonl(DATA / f"{name}.jsonl"), cfg.seq_len)
    for layer in loaded.model.model.layers:  # drop the generation engine's KV cache before copying
        layer.self_attn.kv_cache = None
    t = time.time()
    result = train_lora(copy.deepcopy(loaded.model), examples, cfg, autocast=autocast, progress=True)
    save_peft(DEMO / name, result.weights, cfg, DEFAULT_HF_NAME, torch.float16)
    (DATA / f"{name}.train_log.json").write_text(json.dumps(
        {"steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "rank": cfg.rank, "alpha": cfg.alpha,
         "seconds": round(time.time() - t), "losses": [round(x, 4) for x in result.losses]}) + "\n")
    print(f"{name}: loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f} in {time.time() - t:.0f}s",
          file=sys.stderr)


def check(loaded, names: list[str], max_tokens: int) -> dict:
    """Held-out answers of the base model and every adapter, in one batched engine run."""
    manager = AdapterManager(tempfile.mkdtemp(prefix="demo-adapters-"), base_spec(loaded))
    refs = {None: None}
    for n in names:
        d = DEMO / n
        refs[n] = manager.upload(n, (d / "adapter_config.json").read_bytes(),
                                 (d / "adapter_model.safetensors").read_bytes())
    jobs = [(p, refs[n]) for n in refs for p in HELD_OUT]
    outs = iter(generate(loaded, jobs, max_tokens, manager))
    evidence = {str(n or "base"): {p: next(outs) for p in HELD_OUT} for n in refs}
    (DATA / "evidence.json").write_text(json.dumps(evidence, indent=1, ensure_ascii=False) + "\n")
    for n, answers in evidence.items():
        for p, a in answers.items():
            print(f"[{n}] {p} -> {a}")
    return evidence


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="caps,json,pirate,onesentence", help="comma-separated rules to train")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--max-tokens", type=int, default=48, help="length of the base model's answers")
    ap.add_argument("--reuse-data", action="store_true", help="keep scripts/demo_data/*.jsonl")
    ap.add_argument("--check", action="store_true", help="only run the held-out check")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core box, 2 threads spin against other jobs)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    loaded = load_model("default", "auto", "cpu")  # bf16 on CPUs with native bf16: the server's dtype
    names = [n for n in args.only.split(",") if n]
    bad = [n for n in names if n not in RULES]
    if bad:
        ap.error(f"unknown rules {bad}; choose from {list(RULES)}")
    if not args.check:
        if not args.reuse_data:
            make_data(loaded, args.max_tokens)
        cfg = TrainConfig(rank=8, alpha=16.0, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seq_len=160)
        for n in names:
            train_one(loaded, n, cfg, autocast=loaded.dtype == torch.bfloat16)
    check(loaded, [n for n in RULES if (DEMO / n / "adapter_model.safetensors").is_file()], 64)
    return 0


if __name__ == "__main__":
    sys.exit(main())
