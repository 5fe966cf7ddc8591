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
"""

from __future__ import annotations

from typing import List, Optional

CHUNK_TOKENS = 2048  # mlx-lm's prefill_step_size: the attention runs on chunks of this many tokens


def layer_major_prefill(model, cache, tokens: List[int], chunk: Optional[int] = None) -> None:
    """Run ``tokens`` through ``model`` (mlx-lm's model with ``StreamingMoE`` blocks) into ``cache``, one
    layer at a time over every chunk (``CHUNK_TOKENS`` by default); computes no logits."""
    import mlx.core as mx
    from mlx_lm.models.base import create_attention_mask, create_ssm_mask

    if not tokens:
        return
    chunk = chunk or CHUNK_TOKENS
    ids = mx.array(tokens)[None]
    spans = [(start, min(start + chunk, len(tokens))) for start in range(0, len(tokens), chunk)]
    embed = model.model.embed_tokens
    xs = [embed(ids[:, a:b]) for a, b in spans]
    mx.eval(xs)
    for layer, layer_cache in zip(model.layers, cache):
        block = layer.mlp
        moe = hasattr(block, "prompt")
        if moe:
            aside = _Aside()
            layer.mlp = aside
        try:
            hs = []
            for x in xs:
                if getattr(layer, "is_linear", False):
                    mask = create_ssm_mask(x, layer_cache)
                else:
                    mask = create_attention_mask(x, layer_cache)
                h = layer(x, mask, layer_cache)  # x + attention (+ 0 from the block standing aside)
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
