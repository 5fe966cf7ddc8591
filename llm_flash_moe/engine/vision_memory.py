"""The memory an image's encoding takes, and the refusal of images that would not fit (``vision`` calls it)."""

from __future__ import annotations

from typing import List

from ..errors import FlashMoeError


def check(flash, images) -> None:
    """Refuse images whose encoding would not fit in the free memory (one line, before any work), saying what
    size would."""
    import mlx.core as mx

    from ..bank.memory import bank_memory

    free, _ = bank_memory()
    config = flash.manifest.config.get("vision_config", {})
    fused = mx.default_device() == mx.gpu and mx.metal.is_available()
    need = encoder_working_bytes(config, images.patches, fused)
    if free is None or need <= free:
        return
    fits, hi = 0, max(images.patches)  # the most patches one image may have now
    while fits < hi:
        mid = (fits + hi + 1) // 2
        fits, hi = (mid, hi) if encoder_working_bytes(config, [mid], fused) <= free else (fits, mid - 1)
    pixels = fits * int(config.get("patch_size", 16)) ** 2
    hint = f"up to about {pixels / 1e6:.2f} megapixels fits now" if fits else "none fits now: free some memory first"
    raise FlashMoeError(f"an image of {max(images.patches):,} patches needs about {need / 1e9:.1f} GB to encode and "
                        f"{free / 1e9:.1f} GB are free; attach a smaller image ({hint})")


def encoder_working_bytes(vision_config: dict, patches: List[int], fused: bool) -> int:
    """Encoding images of ``patches`` patches each, above the resident weights (an upper estimate): attention over
    all of an image's patches at once, fused on Metal (mlx-vlm pads the head size 72 to 80: no scores kept); on
    CUDA (MLX 0.32.4, measured) and the CPU the largest image's fp32 scores exist ~3 times (H100: 12.4 GB, 1080p)."""
    heads, hidden = int(vision_config.get("num_heads", 16)), int(vision_config.get("intermediate_size", 4304))
    scores = 0 if fused else 3 * max(patches) ** 2 * heads * 4
    return (1 << 28) + scores + sum(patches) * hidden * 4 * 4
