"""Chat rendering and prefix reuse: llm's messages through the model's chat template, and how much of this
turn's prompt the next turn will start with (what the prompt cache keeps).

Nothing here imports mlx at module level.
"""

from __future__ import annotations

from typing import List, Optional

import llm

from ..errors import FlashMoeError, one_line

PROBE = "x"  # stand-in content for the look-ahead renderings of the next turn


def template_tools(tools) -> Optional[List[dict]]:
    """llm Tools -> the OpenAI-style function list that chat templates (and mlx-lm's parsers) expect."""
    out = []
    for tool in tools or []:
        if isinstance(tool, llm.Tool):
            schema = tool.input_schema or {"type": "object", "properties": {}}
            out.append({"type": "function", "function": {"name": tool.name, "description": tool.description or "",
                                                         "parameters": schema}})
    return out or None


def chat_messages(messages) -> List[dict]:
    """llm Messages (``prompt.messages``: system, history, new turn) -> chat-template messages.

    Text, images (``{"type": "image"}`` items before the text, one per attachment: ``attachments``), reasoning
    (as ``reasoning_content``), tool calls and tool results reach the template.
    Qwen's template shows an assistant turn's reasoning only while it is part of the current tool-calling
    exchange (after the last user message) and drops it from older history. All system text is merged
    into one leading system message.
    """
    from llm.parts import ReasoningPart, TextPart, ToolCallPart, ToolResultPart

    system: List[str] = []
    out: List[dict] = []
    for message in messages:
        if message.role == "tool":
            for part in message.parts:
                if isinstance(part, ToolResultPart):
                    result = {"role": "tool", "content": part.output, "name": part.name}
                    if part.tool_call_id:
                        result["tool_call_id"] = part.tool_call_id
                    out.append(result)
            continue
        text = "".join(p.text for p in message.parts if isinstance(p, TextPart))
        if message.role == "system":
            if text:
                system.append(text)
            continue
        entry = {"role": message.role, "content": text}
        images = attachments([message])
        if images:
            entry["content"] = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        if message.role == "assistant":
            reasoning = "".join(p.text for p in message.parts if isinstance(p, ReasoningPart) and not p.redacted)
            if reasoning:
                entry["reasoning_content"] = reasoning
            calls = [p for p in message.parts if isinstance(p, ToolCallPart) and not p.server_executed]
            if calls:
                entry["tool_calls"] = [{"type": "function", "id": p.tool_call_id,
                                        "function": {"name": p.name, "arguments": dict(p.arguments or {})}}
                                       for p in calls]
        out.append(entry)
    if system:
        out.insert(0, {"role": "system", "content": "\n\n".join(system)})
    return out


def attachments(messages) -> list:
    """The llm Attachments of ``messages`` (llm Messages), in order."""
    from llm.parts import AttachmentPart

    return [p.attachment for m in messages for p in m.parts if isinstance(p, AttachmentPart) and p.attachment]


def render_prompt(tokenizer, messages: List[dict], thinking: bool, tools: Optional[List[dict]] = None,
                  generation_prompt: bool = True) -> str:
    """The prompt text the model sees, through the model's own chat template (tools included)."""
    if not getattr(tokenizer, "has_chat_template", False):
        if tools:
            raise FlashMoeError("this model has no chat template, so it cannot be given tools")
        return "\n\n".join(m["content"] for m in messages)
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt,
                                             enable_thinking=thinking, tokenize=False)
    except Exception as e:  # jinja's TemplateError and friends: the template refused these messages
        raise FlashMoeError(f"the chat template rejected this conversation: {one_line(e)}")


def history_ids(tokenizer, messages: List[dict], tools, thinking: bool, expand=None) -> Optional[List[int]]:
    """Token ids of ``messages`` rendered as history (no generation prompt); None if the template refuses.
    ``expand``: turns rendered ids into the model's (each image's pad token into its tokens)."""
    try:
        text = render_prompt(tokenizer, messages, thinking, tools, generation_prompt=False)
    except FlashMoeError:
        return None
    ids = tokenizer.encode(text, add_special_tokens=False)
    return expand(ids) if expand else ids


def reuse_point(tokenizer, messages: List[dict], tools, thinking: bool, prompt_ids: List[int],
                expand=None) -> Optional[int]:
    """How much of this prompt the *next* turn will start with: where this prompt and the rendering of
    this conversation plus one more exchange part ways, if inside the prompt.

    With Qwen3.5's template that is right after this turn's ``<|im_start|>assistant\\n``: the
    generation prompt goes on with ``<think>\\n`` (or an empty think block), while history shows the
    answer without its reasoning.
    """
    from mlx_lm.utils import common_prefix_len

    probe = history_ids(tokenizer, messages + [{"role": "assistant", "content": PROBE},
                                               {"role": "user", "content": PROBE}], tools, thinking, expand)
    if probe is None:
        return None
    n = common_prefix_len(prompt_ids, probe)
    return n if 0 < n < len(prompt_ids) else None


def next_turns(tokenizer, history, answer, tools, thinking: bool, expand=None) -> List[List[int]]:
    """Token ids of the conversation as the next turn will render it: after a user message, and (when
    the answer called tools) after the tool results. What the prompt cache may keep is judged by them.

    ``history``: this turn's llm Messages; ``answer``: the assistant Message this turn produced."""
    from llm.parts import Message, TextPart, ToolCallPart, ToolResultPart

    base = list(history) + [answer]
    probes = [base + [Message(role="user", parts=[TextPart(text=PROBE)])]]
    calls = [p for p in answer.parts if isinstance(p, ToolCallPart)]
    if calls:
        probes.append(base + [Message(role="tool", parts=[
            ToolResultPart(name=c.name, output=PROBE, tool_call_id=c.tool_call_id) for c in calls])])
    out = []
    for probe in probes:
        ids = history_ids(tokenizer, chat_messages(probe), tools, thinking, expand)
        if ids is not None:
            out.append(ids)
    return out
