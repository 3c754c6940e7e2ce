"""Structured output: what a request asks to be constrained to, compiled once into an llguidance matcher.

Flow: the HTTP edge turns `response_format` / `structured_outputs` into a `GuideSpec` (kind + source
text), and, in the API's thread pool (never on the engine thread), `GrammarCompiler.compile(spec)`
turns it into a `CompiledGrammar`: llguidance's `LLMatcher` in its start state, checked for errors,
cached by (kind, source) in an LRU. The spec and the compiled grammar ride in `SamplingParams`; the
runner deep-copies the template into one matcher per request (`new_matcher()`), fills every row's
token bitmask in one `LLExecutor` call while the forward pass runs (llguidance drops the GIL), and
advances the matcher with each sampled token (server/engine/runner.py, grammar_masks.py).

Engine choice (measured on this 2-core AVX2 machine with the SmolLM2 tokenizer, docs/structured_output.md):
llguidance 1.9 and xgrammar 0.2.9 both install without touching torch; xgrammar's masks are faster
(about 10 us each after a 23 ms compile) but `import xgrammar` imports torch, which the HTTP edge
must never reach, and its wheel depends on torch and transformers. llguidance is torch-free, compiles
a schema in about 1.4 ms and fills a batch of 32 masks in about 0.8 ms (median) per step.

Grammar syntax for `structured_outputs.grammar`: llguidance's Lark dialect (https://github.com/guidance-ai/llguidance/blob/main/docs/syntax.md):
Lark rules, `%json { ... }` for an embedded JSON schema, `/regex/` lexemes. `regex` is a Rust-regex.
Plain Python, no torch: the HTTP edge imports this module.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import llguidance

MAX_SPEC_BYTES = 32 * 1024  # a schema / regex / grammar longer than this is refused (400)
CACHE_ENTRIES = 256
KINDS = ("json_object", "json_schema", "regex", "grammar")
# JSON compile options: single spaces after ',' and ':' (no free whitespace: a small model could
# otherwise spend its whole budget on newlines).
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Resource caps: grammar size and per-step work (lexer fuel, Earley items) well under llguidance's
# defaults, so that one hostile schema can neither take long to compile nor stall a step.
_LIMITS = dict(max_grammar_size=100_000, initial_lexer_fuel=500_000, step_lexer_fuel=200_000,
               step_max_items=50_000, max_lexer_states=100_000, verbose_errors=False)


class GrammarError(ValueError):
    """A schema, regex or grammar that cannot be used; `param` names the request field (-> 400)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class GuideSpec:
    """What the user asked the output to match. `source` is the canonical text (schemas re-dumped
    compactly, so equal schemas share one cache entry; key order is kept: it is the output's order)."""

    kind: str  # one of KINDS
    source: str
    param: str = "response_format"  # the request field it came from, for error messages

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.param}: unknown structured output kind {self.kind!r}")

    @classmethod
    def json_schema(cls, schema: Any, param: str) -> GuideSpec:
        if not isinstance(schema, dict):
            raise GrammarError(f"{param}: the JSON schema must be an object", param)
        return cls("json_schema", json.dumps(schema, separators=(",", ":")), param)


@dataclass(frozen=True, eq=False, slots=True)
class CompiledGrammar:
    """A compiled grammar in its start state; immutable as far as its users go (they copy it)."""

    spec: GuideSpec
    template: Any = field(repr=False)  # llguidance.LLMatcher, never advanced itself
    vocab_size: int = 0  # the bitmask covers ceil(vocab_size / 32) int32 words per row

    def new_matcher(self) -> Any:
        return self.template.deep_copy()


class GrammarCompiler:
    """Compiles `GuideSpec`s against one tokenizer, with an LRU cache; thread-safe."""

    def __init__(self, tokenizer_json: str, eos_token_ids: tuple[int, ...], vocab_size: int,
                 cache_entries: int = CACHE_ENTRIES) -> None:
        eos = list(eos_token_ids) or None
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos)
        self.vocab_size = self.tokenizer.vocab_size
        self._cache: OrderedDict[tuple[str, str], CompiledGrammar] = OrderedDict()
        self._cap = cache_entries
        self._lock = threading.Lock()
        self.hits = 0
        self.compiles = 0

    def compile(self, spec: GuideSpec) -> CompiledGrammar:
        key = (spec.kind, spec.source)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return hit if hit.spec.param == spec.param else CompiledGrammar(spec, hit.template, hit.vocab_size)
        if len(spec.source.encode()) > MAX_SPEC_BYTES:
            raise GrammarError(f"{spec.param}: at most {MAX_SPEC_BYTES} bytes", spec.param)
        grammar = self._grammar_text(spec)
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0,
                                       limits=llguidance.LLParserLimits(**_LIMITS))
        if matcher.is_error():
            raise GrammarError(f"{spec.param}: {_short(matcher.get_error())}", spec.param)
        compiled = CompiledGrammar(spec, matcher, self.vocab_size)
        with self._lock:
            self.compiles += 1
            self._cache[key] = compiled
            while len(self._cache) > self._cap:
                self._cache.popitem(last=False)
        return compiled

    @staticmethod
    def _grammar_text(spec: GuideSpec) -> str:
        try:
            if spec.kind == "json_object":
                return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS)
            if spec.kind == "json_schema":
                return llguidance.LLMatcher.grammar_from_json_schema(spec.source, defaults=_JSON_OPTIONS)
            if spec.kind == "regex":
                return llguidance.LLMatcher.grammar_from_regex(spec.source)
            return llguidance.LLMatcher.grammar_from_lark(spec.source)
        except (ValueError, TypeError) as exc:
            raise GrammarError(f"{spec.param}: {_short(str(exc))}", spec.param) from None


def _short(message: str, limit: int = 300) -> str:
    message = " ".join(message.split())
    return message if len(message) <= limit else message[: limit - 3] + "..."


_MAKE_LOCK = threading.Lock()  # one compiler per tokenizer, even when the first requests race


def compiler_for(tokenizer: Any, vocab_size: int) -> GrammarCompiler:
    """The compiler of an engine's tokenizer (server/model/tokenizer.py::Tokenizer), made once and kept
    on the tokenizer object itself (one tokenizer per engine)."""
    existing = getattr(tokenizer, "_grammar_compiler", None)
    if existing is None:
        with _MAKE_LOCK:
            existing = getattr(tokenizer, "_grammar_compiler", None)
            if existing is None:
                existing = GrammarCompiler(tokenizer.tok.to_str(), tuple(tokenizer.eos_token_ids), vocab_size)
                tokenizer._grammar_compiler = existing
    return existing
