"""Prefill that reads each expert once per prompt: the prompt goes through the model layer by layer.

mlx-lm's prompt loop runs the whole model on one 2,048-token chunk after another, so every chunk's MoE
layers read the experts that chunk routes to: a long prompt reads most of the model once per chunk (at the
397B's 512 experts a 2,048-token chunk touches ~89 % of them). Here the outer loop runs over the layers and
the inner one over the same 2,048-token chunks. Each layer's attention (or DeltaNet) runs chunk after chunk
on its own cache, exactly as mlx-lm's loop runs it (the layer itself is called, its MoE block standing
aside); the MoE block then computes every token of the prompt (``StreamingMoE.prompt``), reading each
expert the prompt routes to once. The MoE of a token depends on that token alone, so the state equals the
chunked prefill's.

Memory: the prompt's hidden states two or three times over (a layer's input chunks, its attention outputs
and its MoE inputs), ``3 x tokens x hidden`` in the activation dtype (32,768 tokens of the 397B's 4,096:
0.8 GB in bf16, 1.6 GB in fp32 on the CPU backend), plus one chunk's attention and one chunk's expert
work, as in mlx-lm's loop. The KV cache grows as it does there.

Image prompts (``image_prefill``) go through the same loop (``prefill_layers``) on mlx-vlm's model:
its input embeddings (the vision encoder's features merged into the text embeddings) and its multimodal
positions, chunk by chunk as mlx-vlm's own prompt loop passes them.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

CHUNK_TOKENS = 2048  # mlx-lm's prefill_step_size: the attention runs on chunks of this many tokens


def layer_major_prefill(model, cache, tokens: List[int], chunk: Optional[int] = None) -> None:
    """Run ``tokens`` through ``model`` (mlx-lm's model with ``StreamingMoE`` blocks) into ``cache``, one
    layer at a time over every chunk (``CHUNK_TOKENS`` by default); computes no logits."""
    import mlx.core as mx
    from mlx_lm.models.base import create_attention_mask, create_ssm_mask

    if not tokens:
        return
    ids = mx.array(tokens)[None]
    embed = model.model.embed_tokens
    xs = [embed(ids[:, a:b]) for a, b in chunk_spans(len(tokens), chunk)]
    mx.eval(xs)

    def call(layer, x, layer_cache, _):
        if getattr(layer, "is_linear", False):
            mask = create_ssm_mask(x, layer_cache)
        else:
            mask = create_attention_mask(x, layer_cache)
        return layer(x, mask, layer_cache)

    prefill_layers(model.layers, cache, xs, call)


def chunk_spans(tokens: int, chunk: Optional[int] = None) -> List[Tuple[int, int]]:
    """[start, end) of each chunk of a prompt of ``tokens`` tokens (``CHUNK_TOKENS`` each by default)."""
    chunk = chunk or CHUNK_TOKENS
    return [(start, min(start + chunk, tokens)) for start in range(0, tokens, chunk)]


def prefill_layers(layers, cache, xs: list, call: Callable) -> None:
    """The layer-major loop: the prompt's input embeddings ``xs`` (one array per chunk, in order) through
    ``layers`` into ``cache`` (one entry per layer), layer after layer. ``call(layer, x, layer_cache, i)``
    runs ``layer`` on chunk ``i`` as the model's own forward pass calls it (its mask, its positions); the
    layer's MoE block stands aside meanwhile, and then computes the whole prompt at once."""
    import mlx.core as mx

    for layer, layer_cache in zip(layers, cache):
        block = layer.mlp
        moe = hasattr(block, "prompt")
        if moe:
            aside = _Aside()
            layer.mlp = aside
        try:
            hs = []
            for i, x in enumerate(xs):
                h = call(layer, x, layer_cache, i)  # x + attention (+ 0 from the block standing aside)
                mx.eval(h, _state(layer_cache))
                hs.append(h)
        finally:
            if moe:
                layer.mlp = block
        if moe:
            ys = block.prompt(aside.inputs)
            xs = [h + y for h, y in zip(hs, ys)]
            mx.eval(xs)
        else:
            xs = hs
        mx.clear_cache()


class _Aside:
    """Stands in for a MoE block while its layer's attention runs: keeps the block's input (one chunk per
    call) and adds nothing."""

    def __init__(self):
        self.inputs = []

    def __call__(self, x):
        import mlx.core as mx

        mx.eval(x)
        self.inputs.append(x)
        return mx.zeros_like(x)


def _state(layer_cache):
    state = getattr(layer_cache, "state", None)
    return [] if state is None else state


def image_prefill(model, cache, ids, images, positions, start: int, end: int, chunk: Optional[int] = None) -> None:
    """The tokens [start, end) of an image prompt through mlx-vlm's Qwen3.5 ``model`` (its layers holding
    ``StreamingMoE`` blocks) into ``cache``, layer by layer; computes no logits. ``ids`` is the whole prompt
    [1, tokens], ``positions`` its multimodal positions (mlx-vlm's ``get_rope_index``), ``images`` a
    ``vision.Images``. Each layer gets what mlx-vlm's own prompt loop (``generate_step`` with
    ``prefill_step_size=chunk``) gives it: the range's ``get_input_embeddings`` (the images whose tokens lie
    there encoded and merged into the text embeddings) cut into the same chunks, each with its slice of the
    positions and the rotary embedding and masks of mlx-vlm's forward pass."""
    import mlx.core as mx
    from mlx_vlm.models.qwen3_5 import language as qwen  # the masks of mlx-vlm's Qwen3.5 forward pass

    if end <= start:
        return
    pixels, grid = images.between(start, end)
    embeds = model.get_input_embeddings(ids[:, start:end], pixels, image_grid_thw=grid).inputs_embeds
    spans = chunk_spans(end - start, chunk)
    xs = [embeds[:, a:b] for a, b in spans]
    where = [positions[..., start + a:start + b] for a, b in spans]
    layers = model.language_model.model.layers
    rotary = next((layer.self_attn.rotary_emb for layer in layers if not layer.is_linear), None)
    if rotary is None or rotary.fused_apply:  # the attention applies the positions itself
        rotations = [None] * len(xs)
    else:
        rotations = [rotary(x, p) for x, p in zip(xs, where)]
    mx.eval(xs, [r for r in rotations if r is not None])

    def call(layer, x, layer_cache, i):
        if layer.is_linear:
            mask = qwen._create_qwen3_5_ssm_mask(x, layer_cache)
        else:
            mask = qwen._create_qwen3_5_attention_mask(x, layer_cache)
        return layer(x, mask=mask, cache=layer_cache, position_ids=where[i], position_embeddings=rotations[i])

    prefill_layers(layers, cache, xs, call)
