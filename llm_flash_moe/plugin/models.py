"""The llm models: ``<name>-flash`` runs a prepared model, streaming its experts from disk.

The shape of llm-mlx's plugin: the options, the sync and async model classes, and the usage each response
records. Chat rendering is ``chat``, the model's text becomes llm's response in ``answer``, the model is
loaded and run by ``session``, and options meet the model's defaults in ``settings``. Nothing here imports
mlx / mlx_lm at module level: llm imports every plugin on every command.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Optional

import llm
from pydantic import Field, field_validator

from . import constrained
from .images import IMAGE_TYPES, carried
from .. import registry
from .answer import Answer, opens_reasoning
from .chat import attachments, chat_messages, next_turns, render_prompt, reuse_point, template_tools
from ..errors import FlashMoeError
from ..engine.session import GENERATION_LOCK, Turn, check_finite, load, loaded, make_sampler
from .settings import (DEFAULT_MAX_TOKENS, DEFAULT_MIN_P, DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P,
                       Settings, bank_budget, check_experts, resolve_settings, vocab_size, warn)


class _FlashMoe:
    """What the sync and the async ``<name>-flash`` models share."""

    can_stream = True
    supports_tools = True
    supports_schema = True  # constrained decoding: see plugin/constrained.py
    attachment_types = IMAGE_TYPES

    class Options(llm.Options):
        max_tokens: Optional[int] = Field(
            None, description=f"Maximum tokens to generate, reasoning included (default {DEFAULT_MAX_TOKENS}; "
                              "-1: no limit)", ge=-1)
        temperature: Optional[float] = Field(
            None, description=f"Sampling temperature; 0 is greedy (default: the model's generation_config.json, "
                              f"{DEFAULT_TEMPERATURE} for Qwen3.5)", ge=0, allow_inf_nan=False)
        top_p: Optional[float] = Field(
            None, description=f"Nucleus sampling top-p (default: the model's, {DEFAULT_TOP_P} for Qwen3.5)",
            ge=0, le=1, allow_inf_nan=False)
        top_k: Optional[int] = Field(
            None, description=f"Sample from the k most likely tokens; 0 is off (default: the model's, "
                              f"{DEFAULT_TOP_K} for Qwen3.5)", ge=0)
        min_p: Optional[float] = Field(
            None, description=f"Min-p sampling (default {DEFAULT_MIN_P})", ge=0, le=1, allow_inf_nan=False)
        seed: Optional[int] = Field(None, description="Random seed, for repeatable sampling", ge=0, le=2**64 - 1)
        # No bound here: the model's own (flash_layout.check_experts_per_token) says "between 1 and N" in one line.
        experts: Optional[int] = Field(
            None, description="Experts per token, 1 to the model's expert count (default: chosen at prepare time; "
                              "4 for qwen397). Fewer is faster and reads less, at some cost in quality")
        thinking: Optional[bool] = Field(
            None, description="Let the model think before answering; its thinking is shown as reasoning "
                              "(default: the conversation's earlier choice, else on when the model can think; "
                              "off for the random-weight demo)")
        bank_gb: Optional[float] = Field(
            None, description="Expert bank budget in GB: the experts kept in memory where the kernels read them "
                              "(GPU memory on CUDA, unified memory/RAM elsewhere), read from disk only when "
                              "missing (default: the free memory less a reserve, chosen when the model loads; at "
                              "least the smallest bank, twice the experts of one token: 0 is refused)",
            ge=0, allow_inf_nan=False)
        prompt_cache: Optional[bool] = Field(
            None, description="Reuse the model state of the conversation so far (kept in memory and on disk) "
                              "so a follow-up only processes its new tokens (default on)")
        keep_alive: Optional[int] = Field(
            None, description="Seconds the model stays loaded in a background engine that every llm command "
                              "shares after its last use (default: $LLM_FLASH_MOE_KEEP_ALIVE, else 300); 0 runs "
                              "it in this llm process, loaded for this command only", ge=0)

        @field_validator("max_tokens")
        @classmethod
        def _no_zero_tokens(cls, value):
            if value == 0:
                raise ValueError("max_tokens must be at least 1, or -1 for no limit")
            return value

    def __init__(self, name: str):
        self.name = name
        self.model_id = registry.model_id(name)

    def __str__(self) -> str:
        return f"Flash MoE: {self.model_id}"

    def model_dir(self) -> Path:
        path = registry.prepared().get(self.name)
        if path is None:
            raise llm.ModelError(registry.not_prepared_message(self.name))
        return path

    def _events(self, prompt, response, conversation, stop: Optional[threading.Event] = None) -> Iterator:
        from ..cluster import leader
        from ..service import client

        try:
            if client.use_engine(self, prompt.options):  # the shared engine process (service/), or here
                yield from client.events(self, prompt, response, conversation)
                return
            with GENERATION_LOCK:
                yield from leader.guard(self._generate(prompt, response, conversation, stop))  # rank 0 of a cluster
        except FlashMoeError as e:
            raise llm.ModelError(str(e)) from None

    def _generate(self, prompt, response, conversation, stop: Optional[threading.Event] = None) -> Iterator:
        import mlx.core as mx

        from ..engine import prompt_cache

        conversation_id = getattr(conversation, "id", None)
        if prompt.schema is not None:
            constrained.check_schema(prompt.schema)  # a schema llguidance cannot compile fails before the load
        constrained.check_bounds(tools=[t["function"] for t in template_tools(prompt.tools) or ()])
        flash, settings = self._ready(prompt.options, prompt_cache.recall(conversation_id).get("thinking"))
        tokenizer = flash.tokenizer
        tools = template_tools(prompt.tools)
        if tools and not getattr(tokenizer, "has_tool_calling", False):
            raise FlashMoeError(f"{self.model_id} cannot call tools: its chat template has no tool-call format")
        messages = chat_messages(prompt.messages)
        text = render_prompt(tokenizer, messages, settings.thinking, tools)
        images = None
        if attachments(prompt.messages):  # this turn's or an earlier one's: mlx-vlm's model (engine/vision.py)
            from ..engine import vision

            images = vision.for_prompt(flash, self.model_id, text, carried(attachments(prompt.messages)))
        prompt_ids = images.input_ids if images else tokenizer.encode(text, add_special_tokens=False)
        expand = images.expand if images else None
        if not prompt_ids:
            raise FlashMoeError(f"the tokenizer of {self.model_id} turned the prompt into no tokens; "
                                f"run `llm flash-moe verify {self.name}`")
        answer = Answer(tokenizer, tools, response, prompt_ids)
        store = self._prompt_cache(flash) if settings.prompt_cache else None
        if store is not None and images:
            store = vision.image_store(self.name, flash, images, prompt_ids)
        checkpoint = reuse_point(tokenizer, messages, tools, settings.thinking, prompt_ids, expand) if store else None
        constraint = constrained.for_response(tokenizer, flash.directory, vocab_size(flash.manifest.config),
                                              prompt.schema, tools, opens_reasoning(tokenizer, prompt_ids))
        processors = [constraint] if constraint else None
        turn = (vision.ImageTurn(flash, prompt_ids, images, store, checkpoint, processors) if images
                else Turn(flash, prompt_ids, store, checkpoint, logits_processors=processors))
        if settings.seed is not None:
            mx.random.seed(settings.seed)
        sampler = make_sampler(settings)
        stats_before = replace(flash.bank.stats)
        mx.reset_peak_memory()
        last = None
        try:
            for last in turn.steps(settings.max_tokens, sampler):
                if stop is not None and stop.is_set():  # the engine's client went away: a token at most
                    raise FlashMoeError("stopped: the client went away")
                check_finite(last, self.model_id, self.name)
                yield from answer.feed(last.text)
            yield from answer.finish()
            if constraint is None and getattr(last, "finish_reason", None) == "length" and answer.ended_in_reasoning:
                print(file=sys.stderr)  # end the reasoning's line (llm shows it on stderr, without a newline)
                warn(f"the answer was cut off by max_tokens ({settings.max_tokens}) while the model was still "
                     "reasoning, so it has no answer; raise -o max_tokens or turn thinking off with -o thinking false")
            turn.save(next_turns(tokenizer, prompt.messages, answer.message(), tools, settings.thinking, expand))
            if constraint is not None:
                constraint.finish(last, settings.max_tokens)  # a schema'd answer cut off by max_tokens: an error
        finally:
            record_usage(response, last, turn, settings, flash.bank.stats.since(stats_before), flash.bank)
            if constraint is not None:
                response.response_json.update(constraint.stats)
        prompt_cache.remember(conversation_id, thinking=settings.thinking)

    def _prompt_cache(self, flash):
        """This model's PromptCache for its current settings, or None if its cache types are unknown to us."""
        from mlx_lm.models.cache import make_prompt_cache

        from ..engine import prompt_cache

        if not prompt_cache.supported(make_prompt_cache(flash.model)):
            return None
        return prompt_cache.PromptCache(self.name, prompt_cache.identity(flash))

    def _ready(self, options, thinking: Optional[bool] = None):
        """The loaded model, set up for this response's options, and the resolved settings."""
        from ..flash_layout import Manifest

        model_dir = self.model_dir()
        manifest = Manifest.load(model_dir)
        experts = check_experts(options.experts, manifest, self.model_id)  # a bad value fails before the slow load
        held = loaded(model_dir)
        bank_bytes, warning = bank_budget(options.bank_gb, manifest, held=held.bank.nbytes if held else 0,
                                          loaded=held is not None)
        if warning:
            warn(warning)
        flash = load(model_dir, bank_bytes=bank_bytes)
        settings = resolve_settings(options, manifest, model_dir, experts, flash.tokenizer.has_thinking,
                                    vocab_size=vocab_size(manifest.config), thinking=thinking)
        flash.set_experts_per_token(settings.experts_per_token)
        return flash, settings


class FlashMoeModel(_FlashMoe, llm.Model):
    """A prepared Mixture-of-Experts model, experts streamed from disk (``<name>-flash``)."""

    def execute(self, prompt, stream, response, conversation) -> Iterator:
        yield from self._events(prompt, response, conversation)


class FlashMoeAsyncModel(_FlashMoe, llm.AsyncModel):
    """The same model for llm's async API: generation runs in one worker thread (the model is shared
    with the sync model, one generation at a time) and streams through an asyncio queue; the thread is
    joined before ``execute`` returns, also when the consumer stops early."""

    async def execute(self, prompt, stream, response, conversation):
        import asyncio

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone: nobody is listening any more
                pass

        def work() -> None:
            events = self._events(prompt, response, conversation)
            try:
                for event in events:
                    put(("event", event))
                    if stop.is_set():
                        break
            except BaseException as e:  # handed to the consumer, raised there
                put(("error", e))
            finally:
                events.close()
                put(("done", None))

        thread = threading.Thread(target=work, name=f"flash-moe-{self.model_id}", daemon=True)
        thread.start()
        try:
            while True:
                kind, value = await queue.get()
                if kind == "event":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            stop.set()
            await asyncio.to_thread(thread.join)


# ------------------------------------------------------------------------------ usage


def record_usage(response, last, turn: Turn, settings: Settings, stats, bank) -> None:
    """Token usage and ``response_json``: what this run cost (also after an interrupted one).

    ``stats``: the expert bank's BankStats for this response alone (``stats.since(before)``).
    """
    generated = last.generation_tokens if last is not None else 0
    prompt_tokens = len(turn.prompt_ids)
    response.set_usage(input=prompt_tokens, output=generated)
    prompt_tps = None
    if turn.prompt_seconds is not None:
        prompt_tps = round(turn.processed / max(turn.prompt_seconds, 1e-9), 3)
    response.response_json = {
        "finish_reason": getattr(last, "finish_reason", None) or "interrupted",
        "prompt_tokens": prompt_tokens,
        "prompt_tokens_cached": turn.cached,
        "prompt_tokens_processed": turn.processed,
        "prompt_cache": turn.source,
        "prompt_cache_saved": list(turn.saved),
        "generation_tokens": generated,
        "thinking": settings.thinking,
        "prompt_tps": prompt_tps,
        "generation_tps": round(last.generation_tps, 3) if last is not None else None,
        "experts_per_token": settings.experts_per_token,
        "bytes_read": stats.bytes_read,
        "expert_reads": stats.reads,
        "bank_gb": round(bank.nbytes / 1e9, 6),
        "bank_hits": stats.hits,
        "bank_hit_rate": round(stats.hit_rate, 4),
        "prefetch_reads": stats.prefetch_reads,
        "read_seconds": round(stats.read_wait_seconds, 4),
        "peak_memory_gb": round(last.peak_memory, 3) if last is not None else None,
    }
