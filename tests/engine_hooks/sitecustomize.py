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
