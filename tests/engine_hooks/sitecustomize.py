"""Test hook for engine processes started by tests/test_service.py (on their PYTHONPATH): steers the
plugin's sampler as tests/test_conversations.py's ``steer`` does in-process, from the JSON file named by
$LLM_FLASH_MOE_TEST_STEER: {"scripts": [text, ...] (one per response, then <|im_end|>), "delay": seconds per
token (so that requests overlap)}. Without scripts the real sampler samples."""

import json
import os
import time

_PATH = os.environ.get("LLM_FLASH_MOE_TEST_STEER")

if _PATH:
    from llm_flash_moe.plugin import models as plugin

    _real = plugin.make_sampler

    def _make_sampler(settings):
        import mlx.core as mx

        with open(_PATH) as f:
            steer = json.load(f)
        scripts, delay = steer.get("scripts") or [], float(steer.get("delay") or 0)
        sampler = _real(settings)
        if scripts:
            with open(_PATH, "w") as f:
                json.dump(dict(steer, scripts=scripts[1:]), f)
            from llm_flash_moe.engine.session import loaded
            from llm_flash_moe import registry

            flash = loaded(registry.model_dir(os.environ["LLM_FLASH_MOE_TEST_MODEL"]))
            end = flash.tokenizer.convert_tokens_to_ids("<|im_end|>")
            ids = flash.tokenizer.encode(scripts[0], add_special_tokens=False) + [end]

            def sampler(logprobs):
                return mx.array([ids.pop(0) if ids else end])

        def slow(logprobs):
            time.sleep(delay)
            return sampler(logprobs)

        return slow if delay else sampler

    plugin.make_sampler = _make_sampler

# $LLM_FLASH_MOE_TEST_RECORD: the engine process appends one JSON line per generation to that file: the token ids
# it generated and how many ranks it led (tests/test_distributed.py checks a cluster's answers through the engine).
_RECORD = os.environ.get("LLM_FLASH_MOE_TEST_RECORD")

if _RECORD:
    with open("/proc/self/cmdline", "rb") as _f:
        _ENGINE = b"llm_flash_moe.service.server" in _f.read().split(b"\0")

    if _ENGINE:
        import mlx_lm

        _real_generate = mlx_lm.stream_generate

        def _recording(*args, **kwargs):
            from llm_flash_moe.cluster import leader

            tokens = []
            try:
                for response in _real_generate(*args, **kwargs):
                    tokens.append(response.token)
                    yield response
            finally:
                active = leader.active()
                with open(_RECORD, "a") as f:
                    f.write(json.dumps({"pid": os.getpid(), "tokens": tokens,
                                        "ranks": active.cluster.size if active else None}) + "\n")

        mlx_lm.stream_generate = _recording
