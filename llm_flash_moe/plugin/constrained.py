"""Constrained decoding: answers that follow a JSON schema (``llm --schema``) and tool calls that parse.

At every step llguidance (Rust; the engine behind llama.cpp's, vLLM's and SGLang's structured output)
computes which tokens keep the output inside a grammar, and ``Constraint`` (a logits processor in
mlx-lm's generation loop) masks every other token before sampling, so the output cannot leave the
grammar whatever the bits or experts per token. What is constrained:

* ``--schema``: the answer is one JSON value valid under the schema, laid out like ``json.dumps``
  (``", "`` and ``": "``, no other whitespace), followed by the end of the turn. Reasoning stays free:
  when the prompt opens ``<think>``, nothing is masked until the model closes it (only the end of the
  turn is, so an answer always follows), then the answer starts after Qwen's ``"\\n\\n"``.
* tools: text stays free, but once the model opens a ``<tool_call>`` its body must name an offered tool
  and give its arguments as their schemas say, in the model's own call format (Qwen3.5's
  ``<function=...><parameter=...>`` or the JSON one of Qwen3), up to ``</tool_call>``; then only more
  calls or the end of the turn (Qwen's template: no text after a call).
* both: the answer is the JSON value or one or more tool calls.

Objects are closed (``closed``): keys a schema does not name are not generated unless it allows them.

Nothing here imports llguidance, numpy or mlx at module level (llm imports every plugin on every command).
"""

from __future__ import annotations

import json
import weakref
from typing import List, Optional, Sequence

from ..errors import FlashMoeError

# The JSON layout of constrained answers: that of json.dumps (and of the chat template's tojson), with no
# free whitespace, so a weak model cannot fill its budget with spaces.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANSWER_PREFIX_AFTER_THINKING = "\n\n"  # what Qwen3.5 writes (and its template renders) after </think>
TOOL_FORMATS = {"qwen3_coder": "xml", "json_tools": "json"}  # mlx-lm's tool parser -> how calls are written

_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


# ------------------------------------------------------------------------------ grammars


def _one_line(message: str) -> str:
    lines = [line.strip() for line in str(message).splitlines()]
    return " ".join(line for line in lines if line and set(line) != {"^"})


_OPEN_KEYS = ("additionalProperties", "patternProperties", "unevaluatedProperties", "allOf")


def closed(schema, in_all_of: bool = False):
    """``schema`` with every object that lists ``properties`` closed (``"additionalProperties": false``)
    unless it says otherwise itself, as xgrammar's strict mode and OpenAI's structured outputs do: the
    model writes the keys the schema names, not keys of its own (a valid answer either way; a weak model
    otherwise keeps adding keys). Objects that are members of an ``allOf`` stay open (closing them would
    make the whole unsatisfiable)."""
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: closed(sub) for name, sub in value.items()}
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            out[key] = [closed(sub, in_all_of=key == "allOf") for sub in value]
        elif key in _SCHEMA_VALUES:
            out[key] = closed(value)
        else:  # enum, const, default, examples, keywords with plain values
            out[key] = value
    if isinstance(schema.get("properties"), dict) and not in_all_of and not any(k in schema for k in _OPEN_KEYS):
        out["additionalProperties"] = False
    return out


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalItems", "contains", "not", "if", "then", "else", "additionalProperties",
                  "unevaluatedItems", "propertyNames")


# Bounds on a schema (a tool's parameters included) before anything recurses into it or llguidance sees it: a
# chain of 3,000 `$ref`s crashed llguidance 1.x (a segfault, no error), and `closed` recurses per level.
MAX_SCHEMA_DEPTH = 64
MAX_SCHEMA_NODES = 20_000
MAX_SCHEMA_REFS = 500


def schema_problem(schema, what: str = "the schema") -> Optional[str]:
    """Why ``schema`` is beyond the bounds above (None: it is within them), found without recursion."""
    nodes = refs = 0
    stack = [(schema, 1)]
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if depth > MAX_SCHEMA_DEPTH:
            return f"{what} is nested more than {MAX_SCHEMA_DEPTH} levels deep"
        if nodes > MAX_SCHEMA_NODES:
            return f"{what} has more than {MAX_SCHEMA_NODES:,} parts"
        if isinstance(value, dict):
            refs += "$ref" in value
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    if refs > MAX_SCHEMA_REFS:
        return f"{what} has {refs:,} $refs, more than {MAX_SCHEMA_REFS}"
    return None


def check_bounds(schema=None, tools: Optional[Sequence[dict]] = None) -> None:
    """A one-line FlashMoeError when the schema or a tool's parameters are beyond the bounds (simplify it)."""
    named = [(schema, "the schema")] + [(t, f"tool {t.get('name') or (t.get('function') or {}).get('name')!r}")
                                        for t in tools or () if isinstance(t, dict)]
    for value, what in named:
        problem = schema_problem(value, what) if value is not None else None
        if problem:
            raise FlashMoeError(f"{problem}; simplify it")


def check_schema(schema: dict) -> dict:
    """``schema`` as llguidance will use it (objects closed, our JSON layout unless it sets its own
    ``x-guidance``), or a one-line FlashMoeError saying why llguidance cannot compile it."""
    import llguidance

    if not isinstance(schema, dict):
        raise FlashMoeError(f"the schema must be a JSON object, not {type(schema).__name__}")
    check_bounds(schema)
    schema = closed(schema)
    schema = {**schema, "x-guidance": {**JSON_LAYOUT, **(schema.get("x-guidance") or {})}}
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    except (ValueError, TypeError) as e:
        is_error, messages = True, [str(e)]
    if is_error:
        raise FlashMoeError(f"this schema cannot be used for constrained decoding: {_one_line(messages[0])}; "
                            "simplify it (llguidance's JSON Schema support: "
                            "https://github.com/guidance-ai/llguidance/blob/main/docs/json_schema.md)")
    return schema


def _literal(text: str) -> str:
    """A Lark string literal."""
    return json.dumps(text, ensure_ascii=False)


def _json_rule(schema: dict) -> str:
    return "%json " + json.dumps(schema, ensure_ascii=False)


def _with_defs(schema, root: dict) -> dict:
    """A property's schema on its own, carrying the root's definitions so its ``$ref``s still resolve."""
    schema = closed(dict(schema)) if isinstance(schema, dict) else {}
    for key in ("$defs", "definitions"):
        if key in root and key not in schema:
            schema[key] = closed(root[key])
    schema["x-guidance"] = {**JSON_LAYOUT, **(schema.get("x-guidance") or {})}
    return schema


_JSON_TYPES = {"integer", "number", "boolean", "object", "array", "null"}
# mlx-lm's qwen3_coder parser reads an integer through a float: keep integers where that is exact (2**53).
XML_INTEGER_BOUND = 10 ** 15 - 1
XML_LITERALS = {"boolean": ("true", "false", "True", "False"), "null": ("null", "None")}


def _resolve(schema, root: dict) -> dict:
    """``schema`` with a local ``$ref`` (``#/$defs/...``, ``#/definitions/...``) replaced by its target."""
    for _ in range(8):
        ref = schema.get("$ref") if isinstance(schema, dict) else None
        if not (isinstance(ref, str) and ref.startswith("#/")):
            break
        target = root
        for part in ref[2:].split("/"):
            target = target.get(part) if isinstance(target, dict) else None
        if not isinstance(target, dict):
            break
        schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
    return schema if isinstance(schema, dict) else {}


def _xml_value(rule: str, schema, root: dict, end: str) -> List[str]:
    """Rules for one ``<parameter=...>`` value of Qwen3.5's call format, ``end`` included.

    The parser (mlx-lm's qwen3_coder) keeps string-typed values as raw text and converts the others
    from JSON: raw text for "string" (an enum or const as its alternatives, min/maxLength as bounds;
    other string keywords are not enforced) and for values without one plain type, JSON otherwise
    (integers within 15 digits unless the schema bounds them: the parser reads them through a float).
    Raw text cannot contain ``</parameter>`` or ``</tool_call>``, where the parser would cut it.
    """
    schema = _resolve(schema, root)
    kind = schema.get("type")
    if kind == "integer":
        schema = {"minimum": -XML_INTEGER_BOUND, "maximum": XML_INTEGER_BOUND, **schema}
    if kind in XML_LITERALS:  # the template writes Python's spelling (str(True)), the parser takes either
        return [f"{rule}: ({' | '.join(_literal(c) for c in XML_LITERALS[kind])}) {_literal(end)}"]
    if kind in _JSON_TYPES:
        return [f"{rule}: {_json_rule(_with_defs(schema, root))} {_literal(end)}"]
    choices = schema.get("enum", [schema["const"]] if "const" in schema else None)
    if kind in (None, "string") and isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices):
        return [f"{rule}: ({' | '.join(_literal(c) for c in choices)}) {_literal(end)}"]
    low, high = 0, None
    if kind == "string":
        low = int(schema.get("minLength", 0) or 0)
        high = schema.get("maxLength")
    terminal = rule.upper()
    length = f"{{{low},{'' if high is None else int(high)}}}"
    # lazy: the value ends at the first closing tag (text tokens only: a special token cannot appear in it)
    return [f"{rule}[lazy]: {terminal}",
            f"{terminal}: {terminal}_TEXT {_literal(end)}",
            f"{terminal}_TEXT: /(?s:.{length})/ & ~/(?s:.*)<\\/(parameter|tool_call)>(?s:.*)/"]


def _xml_call(tools: Sequence[dict], end_token: int) -> List[str]:
    """Qwen3.5's call body after ``<tool_call>``: ``\\n<function=NAME>\\n``, then
    ``<parameter=P>\\nVALUE\\n</parameter>\\n`` per argument (required ones always, in the schema's order),
    then ``</function>\\n</tool_call>``."""
    rules, names = [], []
    for i, tool in enumerate(tools):
        function = tool["function"]
        params = function.get("parameters") or {}
        props = params.get("properties") or {}
        required = set(params.get("required") or [])
        items = []
        for j, (name, schema) in enumerate(props.items()):
            rules.append(f"p{i}_{j}: {_literal(f'<parameter={name}>' + chr(10))} v{i}_{j}")
            rules += _xml_value(f"v{i}_{j}", schema, params, "\n</parameter>\n")
            items.append(f"p{i}_{j}" + ("" if name in required else "?"))
        rules.append(f"f{i}: {_literal(function['name'] + '>' + chr(10))} {' '.join(items)}".rstrip())
        names.append(f"f{i}")
    return [f'call: "\\n<function=" ({" | ".join(names)}) "</function>\\n" <[{end_token}]>'] + rules


def _renamed_refs(schema, names: dict):
    """``schema`` with its local ``$ref``s to definitions pointed at their new names."""
    if isinstance(schema, list):
        return [_renamed_refs(item, names) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _renamed_refs(value, names) for key, value in schema.items()}
    if isinstance(schema.get("$ref"), str) and schema["$ref"] in names:
        out["$ref"] = names[schema["$ref"]]
    return out


def _json_call(tools: Sequence[dict], end_token: int) -> List[str]:
    """Qwen3's call body after ``<tool_call>``: ``\n{"name": ..., "arguments": {...}}\n</tool_call>``.
    Each tool's definitions move to the root (renamed per tool) so their ``$ref``s still resolve."""
    options, definitions = [], {}
    for i, tool in enumerate(tools):
        function = tool["function"]
        params = dict(function.get("parameters") or {"type": "object", "properties": {}})
        names = {}
        for key in ("$defs", "definitions"):
            for name, sub in (params.pop(key, None) or {}).items():
                names[f"#/{key}/{name}"] = f"#/$defs/t{i}_{name}"
                definitions[f"t{i}_{name}"] = sub
        params = _renamed_refs(params, names)
        options.append({"type": "object", "properties": {"name": {"const": function["name"]}, "arguments": params},
                        "required": ["name", "arguments"]})
        for name in [n for n in definitions if n.startswith(f"t{i}_")]:
            definitions[name] = _renamed_refs(definitions[name], names)
    schema = closed({"anyOf": options, **({"$defs": definitions} if definitions else {})})
    return [f'call: "\\n" {_json_rule({**schema, "x-guidance": JSON_LAYOUT})} "\\n" <[{end_token}]>']


def tool_call_rules(tools: Sequence[dict], tool_format: str, end_token: int) -> List[str]:
    """Lark rules defining ``call``: one call's body, from after ``<tool_call>`` to ``</tool_call>`` included."""
    check_bounds(tools=tools)
    return (_xml_call if tool_format == "xml" else _json_call)(tools, end_token)


def answer_grammar(schema: Optional[dict], tools: Optional[Sequence[dict]], tool_format: Optional[str],
                   start_token: Optional[int], end_token: Optional[int], prefix: str = "") -> str:
    """The Lark grammar of a constrained answer: the JSON value of ``schema`` (checked), or, with tools as
    well, one or more tool calls instead; ``prefix`` first."""
    head = f"{_literal(prefix)} " if prefix else ""
    lines = [f"answer: {_json_rule(check_schema(schema))}"]
    if tools and tool_format:
        lines[0:0] = [f"start: {head}(answer | calls)",
                      f'calls: <[{start_token}]> call ("\\n" <[{start_token}]> call)*']
        lines += tool_call_rules(tools, tool_format, end_token)
    else:
        lines.insert(0, f"start: {head}answer")
    return "\n".join(lines)


def call_grammar(tools: Sequence[dict], tool_format: str, start_token: int, end_token: int) -> str:
    """The Lark grammar of what follows a ``<tool_call>``: its body, then (as Qwen's template asks: no text
    after a call) more calls or the end of the turn."""
    return "\n".join([f'start: call ("\\n" <[{start_token}]> call)*'] + tool_call_rules(tools, tool_format, end_token))


# ------------------------------------------------------------------------------ the engine's tokenizer


def engine_tokenizer(tokenizer, model_dir, vocab_size: Optional[int], stop: int):
    """llguidance's view of the model's tokenizer (every token's bytes, a trie), built once per loaded
    tokenizer and logits width: about 3 s for Qwen3.5's 248,077 tokens, from the model's tokenizer.json
    (through transformers when there is none, or when it lacks the end-of-turn token)."""
    from pathlib import Path

    import llguidance

    built = _TOKENIZERS.setdefault(tokenizer, {})
    key = (vocab_size, stop)
    if key in built:
        return built[key]
    n_vocab = max(vocab_size or 0, len(tokenizer))
    path = Path(model_dir) / "tokenizer.json" if model_dir else None
    llt = None
    try:
        if path is not None and path.is_file():
            llt = llguidance.LLTokenizer(str(path), n_vocab=n_vocab, eos_token=stop)
            if llt.decode_str([stop]) != tokenizer.decode([stop]):  # added tokens only in tokenizer_config.json
                llt = None
        if llt is None:
            import llguidance.hf

            llt = llguidance.hf.from_tokenizer(tokenizer._tokenizer, n_vocab=n_vocab, eos_token=stop)
    except Exception as e:  # a tokenizer llguidance cannot read (not a fast, byte-level one...)
        raise FlashMoeError(f"constrained decoding cannot use this model's tokenizer: {_one_line(e)}")
    built[key] = llt
    return llt


def _single_token(tokenizer, text: Optional[str]) -> Optional[int]:
    if not text:
        return None
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def stop_token(tokenizer) -> int:
    """The token that ends a constrained answer: ``<|im_end|>`` when it ends generation, else an EOS."""
    eos = sorted(getattr(tokenizer, "eos_token_ids", None) or [])
    end = _single_token(tokenizer, "<|im_end|>")
    if end is not None and (end in eos or not eos):
        return end
    if not eos:
        raise FlashMoeError("constrained decoding needs an end-of-turn token, and this model's tokenizer has none")
    return eos[0]


def tool_format(tokenizer) -> Optional[str]:
    """How the model writes calls ("xml", "json"), from the tool parser mlx-lm picked; None if unsupported."""
    parser = getattr(tokenizer, "tool_parser", None)
    module = getattr(parser, "__module__", "") or ""
    return TOOL_FORMATS.get(module.rsplit(".", 1)[-1])


# ------------------------------------------------------------------------------ the logits processor


class Constraint:
    """A logits processor for ``mlx_lm.stream_generate(..., logits_processors=[constraint])``.

    mlx-lm calls it once per generated token with every token it was given or sampled so far (the prompt
    part it processed first, then one more sampled token per call) and the next token's logits. It follows
    the generated tokens through three phases and masks accordingly:

    * reasoning (when the prompt opened ``<think>``): nothing masked but the end of the turn when an answer
      is required; the reasoning's closing token ends it;
    * answer (with a schema): only tokens the answer grammar allows, then only the end of the turn;
    * text (tools without a schema): nothing masked; the tool-call start token starts a call, whose body
      only the call grammar allows, then only more calls or the end of the turn (Qwen's template: no text
      after a call).

    Only a sampler that ignores the mask (or NaN logits) can pick a token the grammar refuses: inside a
    call the output then goes on unconstrained (parsed as before: shown as text if it does not parse); in
    an answer it is an error, raised at once unless the logits are NaN (then the plugin's own check says
    the weights are damaged).

    It works with a prompt cache (it never looks at the prompt) and in the async model's worker thread.
    ``finish(last)`` raises a one-line FlashMoeError when the required answer was cut off.
    """

    def __init__(self, llt, vocab_size: int, answer: Optional[str], call: Optional[str],
                 reasoning_end: Optional[int], call_start: Optional[int], stop: int):
        import llguidance

        self.llt, self.vocab_size, self.stop = llt, vocab_size, stop
        self.answer = self._matcher(llguidance, llt, answer) if answer else None
        self.call = self._matcher(llguidance, llt, call) if call else None
        self.reasoning_end, self.call_start = reasoning_end, call_start
        self.phase = "reasoning" if reasoning_end is not None else ("answer" if self.answer else "text")
        self.seen: Optional[int] = None
        self.mask_seconds = 0.0
        self.masked_tokens = 0
        self._words = None
        self._banned = None
        self.refused = None

    @staticmethod
    def _matcher(llguidance, llt, grammar: str):
        matcher = llguidance.LLMatcher(llt, grammar, log_level=0,
                                       limits=llguidance.LLParserLimits(verbose_errors=False))
        if matcher.is_error():
            raise FlashMoeError("the grammar for constrained decoding does not compile: "
                                f"{_one_line(matcher.get_error())}")
        return matcher

    def __call__(self, tokens, logits):
        import mlx.core as mx

        if self.seen is None:  # the first call: the prompt (or what the prompt cache left of it)
            self.seen = tokens.size
        else:
            mx.async_eval(logits)  # let the model finish this step while the mask is computed
            for token in tokens[self.seen:].tolist():
                self._advance(int(token))
            self.seen = tokens.size
        if self.phase == "refused":
            if not mx.isnan(logits).any().item():
                raise FlashMoeError(self._refused_message())
            return logits  # NaN logits (damaged weights): the plugin's own check reports them as such
        if self.phase == "reasoning":
            return self._ban(logits, [self.stop]) if self.answer is not None else logits
        if self.phase == "text":
            return logits
        return self._masked(logits, self.answer if self.phase == "answer" else self.call)

    def _advance(self, token: int) -> None:
        if self.phase == "reasoning":
            if token == self.reasoning_end:
                self.phase = "answer" if self.answer is not None else "text"
        elif self.phase == "text":
            if token == self.call_start and self.call is not None:
                self.call.reset()
                self.phase = "call"
        else:
            matcher = self.answer if self.phase == "answer" else self.call
            if not matcher.consume_token(token):  # only a sampler that ignores the mask gets here
                if self.phase == "call":  # the call is parsed as before: shown as text if it does not parse
                    self.phase = "text"
                else:
                    self.refused, self.phase = token, "refused"

    def _ban(self, logits, ids: List[int]):
        """``logits`` with ``ids`` made impossible."""
        import mlx.core as mx

        if self._banned is None or self._banned.shape[-1] != logits.shape[-1]:
            bias = [0.0] * logits.shape[-1]
            for i in ids:
                bias[i] = -float("inf")
            self._banned = mx.array(bias, dtype=logits.dtype)
        return logits + self._banned

    def _masked(self, logits, matcher):
        import time

        import mlx.core as mx
        import numpy as np

        width = logits.shape[-1]
        if self._words is None:
            self._words = np.zeros(((max(width, self.vocab_size) + 31) // 32,), dtype=np.int32)
        started = time.perf_counter()
        matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        if matcher.is_error() or not self._words.any():
            raise FlashMoeError(f"constrained decoding reached a state where no token is allowed "
                                f"({_one_line(matcher.get_error()) or 'empty mask'})")
        self.mask_seconds += time.perf_counter() - started
        self.masked_tokens += 1
        allowed = mx.array(np.unpackbits(self._words.view(np.uint8), bitorder="little")[:width])
        # min(logit, +inf) keeps a logit, min(logit, -inf) removes it: 3x faster than mx.where on the CPU
        return mx.minimum(logits, (allowed.astype(logits.dtype) * 2 - 1) * mx.inf)

    def _refused_message(self) -> str:
        text = self.llt.decode_str([self.refused])
        return (f"the sampler chose token {self.refused} ({text!r}), which the schema's grammar does not allow "
                "there, so the answer cannot match the schema")

    def finish(self, last, max_tokens: int) -> None:
        """Raise if a required answer did not end as its grammar allows (cut off by max_tokens)."""
        if self.refused is not None:
            raise FlashMoeError(self._refused_message())
        if self.answer is None or getattr(last, "finish_reason", None) == "stop":
            return
        where = "while the model was still reasoning" if self.phase == "reasoning" else "before the answer was complete"
        raise FlashMoeError(f"the answer was cut off by max_tokens ({max_tokens}) {where}, so it does not match "
                            "the schema; raise -o max_tokens (reasoning counts too; -o thinking false skips it)")

    @property
    def stats(self) -> dict:
        return {"constrained_tokens": self.masked_tokens,
                "mask_ms_per_token": round(1e3 * self.mask_seconds / self.masked_tokens, 4)
                if self.masked_tokens else None}


def for_response(tokenizer, model_dir, vocab_size: Optional[int], schema: Optional[dict],
                 tools: Optional[List[dict]], in_reasoning: bool) -> Optional[Constraint]:
    """The Constraint of one response (None when there is nothing to constrain): the schema's answer
    and/or the tool calls, starting after the reasoning when ``in_reasoning``."""
    if schema is None and not tools:
        return None
    call_format = tool_format(tokenizer) if tools else None
    if schema is None and call_format is None:
        return None  # tools in a call format we have no grammar for: parsed as before, unconstrained
    if schema is not None:
        check_schema(schema)  # a schema llguidance refuses fails here, before the tokenizer is built
    stop = stop_token(tokenizer)
    start = _single_token(tokenizer, getattr(tokenizer, "tool_call_start", None)) if call_format else None
    end = _single_token(tokenizer, getattr(tokenizer, "tool_call_end", None)) if call_format else None
    if call_format and (start is None or end is None):
        call_format = None
        if schema is None:
            return None
    reasoning_end = None
    if in_reasoning:
        reasoning_end = _single_token(tokenizer, getattr(tokenizer, "think_end", None))
        if reasoning_end is None:
            raise FlashMoeError("constrained decoding needs the end of the reasoning to be one token; "
                                "use -o thinking false")
    llt = engine_tokenizer(tokenizer, model_dir, vocab_size, stop)
    answer = call = None
    if schema is not None:
        answer = answer_grammar(schema, tools, call_format, start, end,
                                prefix=ANSWER_PREFIX_AFTER_THINKING if in_reasoning else "")
    elif call_format:
        call = call_grammar(tools, call_format, start, end)
    return Constraint(llt, max(vocab_size or 0, len(tokenizer)), answer, call, reasoning_end,
                      start if call is not None else None, stop)
