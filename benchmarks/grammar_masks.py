"""Token-mask cost of the grammar engines on a real vocabulary (for docs/PERFORMANCE.md).

For each workload (a JSON schema and a valid document for it), the document is tokenized with the real
tokenizer and fed to the engine token by token, as in generation: compute the mask of allowed next tokens
(timed), then accept the token; at the end the stop token must be allowed. Both engines enforce the same
JSON layout (no free whitespace, ", " and ": " separators: what llm-flash-moe asks llguidance for).
Prints one JSON object: setup times, compile time per schema, and mask time per token (median, mean,
p95, max) per workload and over all tokens. With llguidance and llm-flash-moe importable, also the plugin's
own grammar for a Qwen3.5 tool call (``llm_flash_moe.plugin.constrained``), fed the chat template's rendering of one.

    python benchmarks/grammar_masks.py --tokenizer DIR --engine llguidance   # DIR holds tokenizer.json
    python benchmarks/grammar_masks.py --tokenizer DIR --engine xgrammar     # (xgrammar needs torch)

DIR: for the real Qwen3.5 vocabulary, a model prepared by `llm flash-moe prepare --demo`
(``$(dirname "$(llm logs path)")/flash-moe/demo``). Runs without mlx and without llm-flash-moe installed.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time

PROSE = ("Mixture-of-experts models route every token to a few experts out of many, so only a small part "
         "of the weights is read for each token. Les modèles « mixture of experts » ne lisent qu'une petite "
         "partie des poids à chaque jeton. 混合专家模型对每个词元只读取少量专家的权重。"
         "Ünïcödé ✓ 🚀 — done.")

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}
ITEM = {"type": "object",
        "properties": {"title": {"type": "string"}, "status": {"enum": ["draft", "published", "archived"]},
                       "tags": {"type": "array", "items": {"type": "string"}},
                       "scores": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
                       "price": {"type": "number"}},
        "required": ["title", "status", "tags"]}

WORKLOADS = {
    # llm's concise syntax `name, age int`
    "concise": (PERSON, {"name": "Ada Lovelace", "age": 36}),
    # objects, nested arrays, enums, required fields
    "nested": ({"type": "object", "properties": {"items": {"type": "array", "items": ITEM}}, "required": ["items"]},
               {"items": [{"title": f"Expert streaming, part {i}", "status": s, "tags": ["moe", "ssd", f"t{i}"],
                           "scores": [[1.5, 2.25], [i, -3e-2]], "price": 9.99 * i}
                          for i, s in enumerate(["draft", "published", "archived", "published"], 1)]}),
    # --schema-multi: llm wraps the schema as {"items": [...]}
    "multi": ({"type": "object", "properties": {"items": {"type": "array", "items": PERSON}}, "required": ["items"]},
              {"items": [{"name": n, "age": a} for n, a in
                         [("Ada Lovelace", 36), ("Alan Turing", 41), ("Grace Hopper", 85), ("Edsger Dijkstra", 72)]]}),
    # long free text: in a string nearly the whole vocabulary is allowed, the costly case
    "prose": ({"type": "object", "properties": {"summary": {"type": "string"}, "words": {"type": "integer"}},
               "required": ["summary", "words"]},
              {"summary": PROSE, "words": len(PROSE.split())}),
}

SEPARATORS = (", ", ": ")


def document_text(doc) -> str:
    return json.dumps(doc, ensure_ascii=False, separators=SEPARATORS)


class Llguidance:
    def __init__(self, hf_tokenizer, vocab_size: int, stop: int):
        import llguidance
        import llguidance.hf
        import numpy as np

        self.llguidance, self.np = llguidance, np
        self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=stop)
        self.mask = np.zeros(((vocab_size + 31) // 32,), dtype=np.int32)
        self.version = llguidance.__version__

    def compile(self, schema):
        grammar = self.llguidance.LLMatcher.grammar_from_json_schema(
            schema, overrides={"whitespace_flexible": False, "item_separator": SEPARATORS[0],
                               "key_separator": SEPARATORS[1]})
        matcher = self.llguidance.LLMatcher(self.tokenizer, grammar)
        if matcher.is_error():
            raise RuntimeError(matcher.get_error())
        return matcher

    def fill(self, matcher) -> None:
        matcher.unsafe_compute_mask_ptr(self.mask.ctypes.data, self.mask.nbytes)

    def allowed(self, token: int) -> bool:
        return bool((int(self.mask[token // 32]) >> (token % 32)) & 1)

    def accept(self, matcher, token: int) -> bool:
        return matcher.consume_token(token)


class Xgrammar:
    def __init__(self, hf_tokenizer, vocab_size: int, stop: int):
        import numpy as np
        import xgrammar

        self.xgrammar, self.np = xgrammar, np
        info = xgrammar.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size, stop_token_ids=[stop])
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=2)
        self.mask = np.zeros((1, (vocab_size + 31) // 32), dtype=np.int32)
        from importlib.metadata import version

        self.version = version("xgrammar")

    def compile(self, schema):
        compiled = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                     separators=SEPARATORS, strict_mode=True)
        return self.xgrammar.GrammarMatcher(compiled)

    def fill(self, matcher) -> None:
        matcher.fill_next_token_bitmask(self.mask)

    def allowed(self, token: int) -> bool:
        return bool((int(self.mask[0, token // 32]) >> (token % 32)) & 1)

    def accept(self, matcher, token: int) -> bool:
        return matcher.accept_token(token)


def summary(ms):
    ms = sorted(ms)
    return {"tokens": len(ms), "median_ms": round(statistics.median(ms), 4), "mean_ms": round(statistics.fmean(ms), 4),
            "p95_ms": round(ms[int(0.95 * (len(ms) - 1))], 4), "max_ms": round(ms[-1], 4)}


def tool_call(engine, hf, stop: int, repeats: int) -> dict:
    """Mask times along the template's rendering of a call, under the plugin's call grammar."""
    from llm_flash_moe.plugin import constrained

    tools = [{"type": "function", "function": {"name": "search", "description": "Search the web", "parameters": {
        "type": "object", "required": ["query"],
        "properties": {"query": {"type": "string"}, "limit": {"type": "integer"},
                       "where": {"type": "object", "properties": {"city": {"type": "string"}}}}}}}]
    arguments = {"query": PROSE, "limit": 5, "where": {"city": "Paris"}}
    call = {"type": "function", "function": {"name": "search", "arguments": arguments}}
    text = hf.apply_chat_template([{"role": "user", "content": "hi"},
                                   {"role": "assistant", "content": "", "tool_calls": [call]}],
                                  tools=tools, tokenize=False)
    text = text[text.rindex("<tool_call>"):text.rindex("</tool_call>") + len("</tool_call>")]
    ids = hf.encode(text, add_special_tokens=False)
    grammar = constrained.call_grammar(tools, "xml", ids[0], ids[-1])
    times = []
    for _ in range(repeats):
        matcher = engine.llguidance.LLMatcher(engine.tokenizer, grammar)
        for token in ids[1:] + [stop]:
            t0 = time.perf_counter_ns()
            engine.fill(matcher)
            times.append((time.perf_counter_ns() - t0) / 1e6)
            if not engine.allowed(token) or not engine.accept(matcher, token):
                raise RuntimeError(f"the call grammar refused token {token} ({hf.decode([token])!r})")
    return summary(times)


def random_walk(engine, schema, steps: int, stop: int, rng) -> list:
    """Mask times along a walk that picks uniformly among the allowed tokens (restarting when done)."""
    np = engine.np
    times = []
    matcher = engine.compile(schema)
    while len(times) < steps:
        t0 = time.perf_counter_ns()
        engine.fill(matcher)
        times.append((time.perf_counter_ns() - t0) / 1e6)
        bits = np.unpackbits(np.ascontiguousarray(engine.mask).reshape(-1).view(np.uint8), bitorder="little")
        allowed = np.flatnonzero(bits)
        token = int(allowed[rng.randrange(len(allowed))])
        if token == stop:
            matcher = engine.compile(schema)
            continue
        if not engine.accept(matcher, token):
            raise RuntimeError(f"the engine refused token {token}, which its own mask allowed")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="directory with tokenizer.json (and tokenizer_config.json)")
    parser.add_argument("--engine", choices=["llguidance", "xgrammar"], required=True)
    parser.add_argument("--vocab-size", type=int, default=248320, help="logits width (Qwen3.5: 248,320)")
    parser.add_argument("--stop", default="<|im_end|>", help="the token that ends the answer")
    parser.add_argument("--repeats", type=int, default=3, help="passes over each document")
    parser.add_argument("--walk", type=int, default=200,
                        help="also take this many steps per schema choosing uniformly among the allowed tokens "
                             "(seeded): the states a random-weight model visits")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(args.tokenizer)
    stop = hf.convert_tokens_to_ids(args.stop)
    started = time.perf_counter()
    engine = (Llguidance if args.engine == "llguidance" else Xgrammar)(hf, args.vocab_size, stop)
    out = {"engine": args.engine, "version": engine.version, "machine": platform.machine(),
           "python": platform.python_version(), "vocab_size": args.vocab_size, "tokenizer_size": len(hf),
           "tokenizer_setup_s": round(time.perf_counter() - started, 3), "workloads": {}}
    everything = []
    for name, (schema, doc) in WORKLOADS.items():
        ids = hf.encode(document_text(doc), add_special_tokens=False)
        started = time.perf_counter()
        engine.compile(schema)
        compile_s = time.perf_counter() - started
        times = []
        for _ in range(args.repeats):
            matcher = engine.compile(schema)
            for token in ids + [stop]:
                t0 = time.perf_counter_ns()
                engine.fill(matcher)
                times.append((time.perf_counter_ns() - t0) / 1e6)
                if not engine.allowed(token) or not engine.accept(matcher, token):
                    raise RuntimeError(f"{args.engine} refused token {token} ({hf.decode([token])!r}) in {name}")
        everything += times
        out["workloads"][name] = {"compile_ms": round(compile_s * 1e3, 2), **summary(times)}
        if args.walk:
            walk = random_walk(engine, schema, args.walk, stop, random.Random(0))
            everything += walk
            out["workloads"][name + " (random walk)"] = summary(walk)
    out["all"] = summary(everything)
    if args.engine == "llguidance":
        try:
            out["workloads"]["tool call (llm-flash-moe's Qwen3.5 grammar)"] = tool_call(engine, hf, stop, args.repeats)
        except ImportError:
            pass
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
