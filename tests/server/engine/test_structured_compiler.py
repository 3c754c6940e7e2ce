"""GrammarCompiler (server/engine/structured.py) on the tiny byte-level tokenizer: cache by schema,
errors that name the field, the size cap, and matchers that accept exactly the grammar's strings."""
from __future__ import annotations

import pytest

from server.engine.structured import MAX_SPEC_BYTES, GrammarCompiler, GrammarError, GuideSpec
from tests.server.model.tiny import byte_tokenizer


@pytest.fixture(scope="module")
def compiler():
    tok = byte_tokenizer()
    return GrammarCompiler(tok.to_str(), (2,), tok.get_vocab_size()), tok


def _accepts(compiled, tok, text: str) -> bool:
    m = compiled.new_matcher()
    return all(m.consume_token(t) for t in tok.encode(text).ids) and m.is_accepting()


def test_cache_by_schema_and_fresh_matchers(compiler):
    comp, tok = compiler
    schema = {"type": "object", "properties": {"a": {"enum": ["x", "y"]}}, "required": ["a"], "additionalProperties": False}
    first = comp.compile(GuideSpec.json_schema(schema, "response_format"))
    again = comp.compile(GuideSpec.json_schema(dict(schema), "structured_outputs.json"))
    assert again.template is first.template and comp.hits >= 1
    assert _accepts(first, tok, '{"a": "x"}') and not _accepts(first, tok, '{"a": "z"}')
    assert _accepts(first, tok, '{"a": "y"}')  # each new_matcher starts fresh


def test_regex_and_lark(compiler):
    comp, tok = compiler
    rx = comp.compile(GuideSpec("regex", "[0-9]{2}-[a-c]", "structured_outputs.regex"))
    assert _accepts(rx, tok, "42-b") and not _accepts(rx, tok, "4-b")
    lark = comp.compile(GuideSpec("grammar", 'start: "x=" NUM\nNUM: /[1-9]/', "structured_outputs.grammar"))
    assert _accepts(lark, tok, "x=7") and not _accepts(lark, tok, "x=0")


@pytest.mark.parametrize("spec, param", [
    (GuideSpec("regex", "(open", "structured_outputs.regex"), "structured_outputs.regex"),
    (GuideSpec("grammar", "start: nowhere", "structured_outputs.grammar"), "structured_outputs.grammar"),
    (GuideSpec("json_schema", '{"type": "nope"}', "response_format.json_schema.schema"),
     "response_format.json_schema.schema"),
    (GuideSpec("regex", "a" * (MAX_SPEC_BYTES + 1), "structured_outputs.regex"), "structured_outputs.regex"),
])
def test_errors_name_the_field(compiler, spec, param):
    with pytest.raises(GrammarError) as info:
        compiler[0].compile(spec)
    assert info.value.param == param and str(info.value).startswith(param + ":")


def test_schema_must_be_an_object():
    with pytest.raises(GrammarError, match="must be an object"):
        GuideSpec.json_schema([1, 2], "structured_outputs.json")
