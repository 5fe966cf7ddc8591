"""Images: mlx-vlm's vision encoder, processor and multimodal (M-RoPE) positions in front of the streaming engine.

A prompt with images runs through mlx-vlm's own Qwen3.5 model, built once per loaded model on the same arrays
as the text path's mlx-lm model (no second copy of the resident weights) with the same streaming MoE blocks
(the expert bank): the prompt layer by layer (``prefill.image_prefill``), then mlx-vlm's ``generate_step``.
The vision encoder's weights are read from the prepared model's vision file the first time an image arrives.
mlx-vlm is the ``vision`` extra; nothing here imports it, or mlx, at module level.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

from ..errors import FlashMoeError, one_line
from . import vision_memory
from .session import Turn

EXTRA = "vision"
INSTALL_HINT = f"llm install 'llm-flash-moe[{EXTRA}]'"
DIGEST_WORDS = 8  # an image's pad tokens carry its digest, 31 bits per token, into the prompt-cache key


def require_mlx_vlm():
    """mlx-vlm, or one line naming the extra that brings it."""
    try:
        import mlx_vlm  # noqa: F401
    except ImportError:
        raise FlashMoeError(f"images need mlx-vlm, the plugin's `{EXTRA}` extra: {INSTALL_HINT} "
                            "(or `pip install 'llm-flash-moe[vision]'` in a checkout)") from None
    return mlx_vlm


def check_has_vision(manifest, model_id: str) -> None:
    if not manifest.vision:
        raise FlashMoeError(f"{model_id} was prepared without a vision encoder (its source has none), so it "
                            "cannot look at images; prepare a source that has one (Qwen3.5's releases do)")


# ------------------------------------------------------------------------------ one prompt's images


def for_prompt(flash, model_id: str, prompt_text: str, attachments) -> Images:
    """The images of a prompt (every attachment of the conversation, in order), checked and processed."""
    check_has_vision(flash.manifest, model_id)
    require_mlx_vlm()
    images = process(flash, prompt_text, read_images(attachments))
    vision_memory.check(flash, images)
    return images


def read_images(attachments) -> List[tuple]:
    """(digest, PIL image) of each attachment, read as mlx-vlm reads images; one line for one that is not."""
    from mlx_vlm.utils import load_image

    out = []
    for att in attachments:
        label = att.path or att.url or "the attached image"
        try:
            content = att.content_bytes()
            image = load_image(io.BytesIO(content))
        except Exception as e:  # a missing file, a failed download, not a picture, a decompression bomb
            reason = re.sub(r" ?<_io\.BytesIO object at 0x\w+>", "", one_line(e.__cause__ or e))  # PIL's, mlx-vlm's
            raise FlashMoeError(f"cannot read the image {label}: {reason}; attach a PNG, JPEG, WebP or GIF file")
        out.append((hashlib.sha256(content).hexdigest(), image))
    return out


@dataclass
class Images:
    """The processed images of one prompt: the prompt's token ids with each image's pad token expanded to
    its tokens, the pixels, and where each image's tokens lie."""

    input_ids: List[int]
    pixel_values: object  # mx.array [patches, channels * t * p * p]
    grid_thw: object  # mx.array [images, 3]
    digests: List[str]
    spans: List[tuple]  # (first token, end) per image
    patches: List[int]  # rows of pixel_values per image
    pad_id: int  # the image pad token

    def expand(self, ids: Sequence[int]) -> List[int]:
        """Rendered ids with each image's pad token expanded as in this prompt (see ``expand``)."""
        return expand(ids, self.pad_id, self.counts)

    @property
    def counts(self) -> List[int]:
        return [end - start for start, end in self.spans]

    def key_ids(self) -> List[int]:
        """The token ids the prompt cache files states under: each image's pad tokens replaced by words of
        its digest (negative, so never a real token), so that a state holding one image never serves
        another of the same size."""
        ids = list(self.input_ids)
        for digest, (start, end) in zip(self.digests, self.spans):
            words = [-1 - (int(digest[8 * i:8 * i + 8], 16) & 0x7FFFFFFF) for i in range(DIGEST_WORDS)]
            for j in range(start, end):
                ids[j] = words[(j - start) % DIGEST_WORDS]
        return ids

    def splits(self, position: int) -> bool:
        """Whether ``position`` falls inside an image's tokens (a state there cannot be continued)."""
        return any(start < position < end for start, end in self.spans)

    def between(self, start: int, end: int):
        """(pixel_values, grid_thw) of the images whose tokens lie in [start, end), or (None, None)."""
        import mlx.core as mx

        rows, chosen, first = [], [], 0
        for i, ((s, e), n) in enumerate(zip(self.spans, self.patches)):
            if start <= s and e <= end:
                rows.append(self.pixel_values[first:first + n])
                chosen.append(i)
            first += n
        if not chosen:
            return None, None
        return mx.concatenate(rows), self.grid_thw[mx.array(chosen)]


def expand(ids: Sequence[int], pad_id: int, counts: List[int]) -> List[int]:
    """``ids`` with the k-th ``pad_id`` repeated ``counts[k]`` times (as the processor expands a rendered
    prompt): the look-ahead renderings of the next turn, compared with this prompt token for token."""
    out, k = [], 0
    for t in ids:
        if t == pad_id and k < len(counts):
            out.extend([t] * counts[k])
            k += 1
        else:
            out.append(t)
    return out


def process(flash, prompt_text: str, images: List[tuple]) -> Images:
    """Run mlx-vlm's processor on the rendered prompt and the images (as mlx-vlm's ``stream_generate`` does)."""
    from mlx_vlm.utils import prepare_inputs, should_add_special_tokens

    vlm = vision_model(flash)
    processor = vlm.processor
    try:
        inputs = prepare_inputs(processor, images=[image for _, image in images], prompts=prompt_text,
                                image_token_index=vlm.config.image_token_index,
                                add_special_tokens=should_add_special_tokens(vlm.config.model_type, processor))
    except (ValueError, OSError) as e:
        raise FlashMoeError(f"the image processor refused these images: {one_line(e)}")
    ids = inputs["input_ids"].reshape(-1).tolist()
    grid = inputs["image_grid_thw"]
    merge = vlm.config.vision_config.spatial_merge_size ** 2
    patches = [int(t * h * w) for t, h, w in grid.tolist()]
    spans, position = [], 0
    pad = vlm.config.image_token_index
    for n in patches:
        start = ids.index(pad, position)
        spans.append((start, start + n // merge))
        position = start + n // merge
    return Images(ids, inputs["pixel_values"], grid, [d for d, _ in images], spans, patches, pad)


# ------------------------------------------------------------------------------ the model


class VisionLanguageModel:
    """mlx-vlm's model of a prepared model, on the text path's arrays and MoE blocks, with its processor."""

    def __init__(self, flash):
        import mlx.core as mx
        import mlx.nn as nn
        from mlx.utils import tree_flatten

        from mlx_vlm.utils import get_model_and_args, load_processor

        directory = flash.directory
        config = json.loads((directory / "config.json").read_text())
        module, _ = get_model_and_args(config=config)
        self.config = module.ModelConfig.from_dict(config)
        model = module.Model(self.config)
        blocks = dict(enumerate(flash.model.layers))
        for i, layer in enumerate(model.language_model.model.layers):
            layer.mlp = blocks[i].mlp  # the streaming MoE block itself: one bank, one experts-per-token
        text = dict(tree_flatten(flash.model.parameters()))
        vision = model.vision_tower.sanitize(model.sanitize(
            dict(mx.load(str(directory / flash.manifest.vision["file"])))))
        quant = config.get("quantization") or {}

        def quantized(path, module):
            if not hasattr(module, "to_quantized"):
                return False
            if f"{path}.scales" in text:
                own = quant.get(path) if isinstance(quant.get(path), dict) else quant
                return {"group_size": own["group_size"], "bits": own["bits"], "mode": own.get("mode", "affine")}
            if f"{path}.scales" in vision:
                return {"group_size": quant["group_size"], "bits": quant["bits"], "mode": quant.get("mode", "affine")}
            return False

        nn.quantize(model, class_predicate=quantized)
        dtype = next(v.dtype for v in text.values() if mx.issubdtype(v.dtype, mx.floating))
        # The text path runs in its weights' dtype, or fp32 (the CPU default): so does the encoder.
        vision = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in vision.items()}
        try:
            model.load_weights(list(text.items()) + list(vision.items()), strict=True)
        except ValueError as e:
            raise FlashMoeError(f"the vision encoder of {directory} does not load into mlx-vlm's model: "
                                f"{one_line(e)}; run `llm flash-moe verify`")
        mx.eval(model.vision_tower.parameters())
        model.eval()
        self.model = model
        self.vision_bytes = sum(v.nbytes for _, v in tree_flatten(model.vision_tower.parameters()))
        try:
            self.processor = load_processor(directory, eos_token_ids=config.get("eos_token_id"))
        except Exception as e:  # transformers raises many kinds for a missing or damaged processor file
            raise FlashMoeError(f"cannot load the image processor of {directory}: {one_line(e)}; "
                                "prepare the model again (preprocessor_config.json comes from its source)")


def vision_model(flash) -> VisionLanguageModel:
    """The loaded model's VisionLanguageModel, built on its first image."""
    require_mlx_vlm()
    if flash.vision is None:
        flash.vision = VisionLanguageModel(flash)
    return flash.vision


# ------------------------------------------------------------------------------ caches


def to_vlm_caches(caches) -> list:
    """mlx-lm cache objects (what the prompt cache keeps) as mlx-vlm's, holding the same arrays."""
    from mlx_lm.models import cache as lm
    from mlx_vlm.models import cache as vlm

    out = []
    for c in caches:
        if isinstance(c, lm.KVCache):
            v = vlm.KVCache()
            if c.keys is not None:
                v.state = (c.keys[..., :c.offset, :], c.values[..., :c.offset, :])
        else:
            v = vlm.ArraysCache(size=len(c.cache))
            v.cache = list(c.cache)
        out.append(v)
    return out


def to_lm_caches(caches) -> list:
    """mlx-vlm cache objects as mlx-lm's (what ``prompt_cache.freeze`` and the disk format take)."""
    from mlx_lm.models import cache as lm
    from mlx_vlm.models import cache as vlm

    out = []
    for c in caches:
        if isinstance(c, vlm.KVCache):
            k = lm.KVCache()
            k.keys, k.values, k.offset = c.keys, c.values, c.offset
        elif isinstance(c, vlm.ArraysCache):
            k = lm.ArraysCache(size=len(c.cache))
            k.cache = list(c.cache)
        else:
            raise FlashMoeError(f"mlx-vlm made a {type(c).__name__} cache, which the prompt cache cannot keep")
        out.append(k)
    return out


class KeyedStore:
    """A PromptCache seen through token ids: states are filed under ``Images.key_ids`` instead."""

    def __init__(self, store, prompt_ids: List[int], key_ids: List[int]):
        self.store, self.prompt_ids, self.key_ids = store, prompt_ids, key_ids

    def _key(self, tokens: Sequence[int]) -> List[int]:
        n = len(self.prompt_ids)
        return self.key_ids[:min(len(tokens), n)] + list(tokens[n:])

    def lookup(self, tokens):
        return self.store.lookup(self._key(tokens))

    def save(self, tokens, caches) -> bool:
        return self.store.save(self._key(tokens), caches)


def image_store(name: str, flash, images: Images, prompt_ids: List[int]):
    """The prompt cache of image prompts: mlx-vlm's states, apart from the text path's, keyed by the images."""
    import mlx_vlm

    from . import prompt_cache

    ident = dict(json.loads(prompt_cache.identity(flash)), mlx_vlm=mlx_vlm.__version__)
    return KeyedStore(prompt_cache.PromptCache(name, json.dumps(ident, sort_keys=True)), prompt_ids, images.key_ids())


# ------------------------------------------------------------------------------ one response


class _Fed:
    """mlx-vlm's loop feeds every token it hands out: there is nothing put off to feed later."""

    def feed_pending(self) -> None:
        pass


class ImageTurn(Turn):
    """A Turn whose prompt holds images, on mlx-vlm's model: the prompt layer by layer as the text path's
    (``prefill.image_prefill``), then mlx-vlm's ``generate_step`` for its last token and the answer, with the
    positions (and rope deltas) of mlx-vlm's ``get_rope_index`` over the whole prompt, so that a state from the
    prompt cache continues at the right multimodal positions."""

    def __init__(self, flash, prompt_ids, images: Images, store=None, checkpoint=None, logits_processors=None):
        super().__init__(flash, prompt_ids, store, checkpoint, logits_processors)
        self.images = images

    def steps(self, max_tokens: int, sampler) -> Iterator:
        import mlx.core as mx
        from mlx_lm.generate import GenerationResponse

        from mlx_vlm.generate import generate_step

        from . import prompt_cache
        from .prefill import image_prefill

        vlm = vision_model(self.flash)
        lm = vlm.model.language_model
        started = time.perf_counter()
        hit = self.store.lookup(self.prompt_ids) if self.store is not None else None
        if hit is not None and self.images.splits(hit.length):
            hit = None  # never the case at the prefixes the plugin keeps; a full prefill is always right
        if hit is not None:
            cache, self.cached, self.source = to_vlm_caches(hit.caches), hit.length, hit.source
        else:
            cache = lm.make_cache()
        self._cache = cache
        ids = mx.array(self.prompt_ids)[None]
        positions, deltas = lm.get_rope_index(ids, self.images.grid_thw, None, None)
        lm._position_ids = lm._rope_deltas = None  # as a freshly loaded mlx-vlm model starts

        def run(start: int, end: int, tokens: int):
            pixels, grid = self.images.between(start, end)
            return generate_step(ids[:, start:end], vlm.model, pixels, None, max_tokens=tokens, sampler=sampler,
                                 prompt_cache=cache, logits_processors=self.logits_processors,
                                 image_grid_thw=grid, position_ids=positions, rope_deltas=deltas)

        def prefill(start: int, end: int):
            if self.flash.cluster is None:
                image_prefill(vlm.model, cache, ids, self.images, positions, start, end)
            else:  # a model leading a cluster announces each call to the workers: mlx-vlm's own prompt loop
                for _ in run(start, end, 0):
                    pass

        position = self.prefill_prompt(prefill, lambda: prompt_cache.freeze(to_lm_caches(cache)))
        self._model = _Fed()
        detokenizer, ends = self.flash.tokenizer.detokenizer, set(self.flash.tokenizer.eos_token_ids)
        detokenizer.reset()
        tic, prompt_tps = time.perf_counter(), 0.0
        for n, (token, logprobs) in enumerate(run(position, len(self.prompt_ids), max_tokens), start=1):
            if n == 1:
                self.prompt_seconds = time.perf_counter() - started
                prompt_tps = self.processed / max(self.prompt_seconds, 1e-9)
                tic = time.perf_counter()
            finish = "stop" if token in ends else ("length" if n == max_tokens else None)
            if finish != "stop":
                detokenizer.add_token(token)
            if finish:
                detokenizer.finalize()
            self.generated.append(token)
            yield GenerationResponse(
                text=detokenizer.last_segment, token=token, logprobs=logprobs, from_draft=False,
                prompt_tokens=self.processed, prompt_tps=prompt_tps, generation_tokens=n,
                generation_tps=n / max(time.perf_counter() - tic, 1e-9), peak_memory=mx.get_peak_memory() / 1e9,
                finish_reason=finish)
            if finish:
                break
        self._cache = to_lm_caches(cache)
        self.finished = True
