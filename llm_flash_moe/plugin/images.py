"""Image attachments as the model receives them: read once, by the llm process, at most ``MAX_IMAGE_BYTES``
each, and carried to the engine (service/) inside the prompt's messages.

The llm process reads each attachment (a file, a URL, or content given in Python) with llm's own
``Attachment.content_bytes()``: the engine never opens the user's files or fetches the web. What could not be
read travels as its error, raised where the image is used (``vision.read_images``), so an image prompt fails
with the same line, at the same point, in the llm process and in the engine; a file's path or URL stays the
label in those lines. In the llm process the same ``CarriedImage`` stands in for each attachment, so the size
limit is the same both ways.

Nothing here imports mlx.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from typing import List, Optional

import llm

from ..errors import one_line

IMAGE_TYPES = {"image/png", "image/jpeg", "image/webp", "image/gif"}  # what mlx-vlm's processor reads (Pillow)
MAX_IMAGE_BYTES = 64 * 2**20  # per image: a 4032 x 3024 RGBA PNG of noise (incompressible) is 48.8 MB
MAX_LABEL = 4096  # characters of a path or URL kept as the label


class UnreadableImage(OSError):
    """Raised by ``CarriedImage.content_bytes`` for an attachment the llm process could not read."""


@dataclass
class CarriedImage(llm.Attachment):
    """An attachment read once: its bytes (``content``), or ``error``, the one line reading it gave."""

    error: Optional[str] = None

    @classmethod
    def read(cls, attachment: llm.Attachment) -> "CarriedImage":
        """``attachment`` read (a file's size is checked before it is read)."""
        if isinstance(attachment, CarriedImage):
            return attachment
        carried = cls(type=attachment.type, path=attachment.path, url=attachment.url)
        try:
            size = os.stat(attachment.path).st_size if attachment.path and not attachment.content else 0
            if size <= MAX_IMAGE_BYTES:
                carried.content = attachment.content_bytes() or b""
                size = len(carried.content)
        except Exception as e:  # a missing or unreadable file, a failed download
            carried.content, carried.error = None, one_line(e)
            return carried
        if size > MAX_IMAGE_BYTES:
            carried.content, carried.error = None, too_large(size)
        return carried

    def content_bytes(self) -> bytes:
        if self.error is not None:
            raise UnreadableImage(self.error)
        return self.content or b""

    def to_wire(self) -> dict:
        """The attachment as the engine's ``generate`` request carries it (base64 content)."""
        out = {"type": self.type, "path": self.path, "url": self.url}
        if self.error is not None:
            out["error"] = self.error
        else:
            out["content"] = base64.b64encode(self.content or b"").decode("ascii")
        return out

    @classmethod
    def from_wire(cls, data) -> "CarriedImage":
        """``to_wire``'s dict back (checked: what does not hold is an unreadable image, not a crash)."""
        if not isinstance(data, dict):
            data = {}
        text = {k: data[k][:MAX_LABEL] if isinstance(data.get(k), str) else None for k in ("type", "path", "url")}
        carried = cls(**text)
        if isinstance(data.get("error"), str):
            carried.error = data["error"][:1000]
            return carried
        content = data.get("content")
        if not isinstance(content, str):
            carried.error = "no image content arrived"
        elif len(content) > base64_chars(MAX_IMAGE_BYTES):
            carried.error = too_large(len(content) * 3 // 4)
        else:
            try:
                carried.content = base64.b64decode(content, validate=True)
            except (binascii.Error, ValueError):
                carried.error = "its content is not valid base64"
        return carried


def base64_chars(size: int) -> int:
    """How many base64 characters ``size`` bytes take."""
    return (size + 2) // 3 * 4


def too_large(size: int) -> str:
    return (f"it is {size / 1e6:.1f} MB, more than the {MAX_IMAGE_BYTES / 2**20:.0f} MiB one image may be "
            "(fewer pixels, or JPEG, make it smaller)")


def carried(attachments) -> List[CarriedImage]:
    return [CarriedImage.read(a) for a in attachments]


def wire_messages(messages) -> List[dict]:
    """llm Messages as the engine's request carries them: ``Message.to_dict``, each attachment read here."""
    from llm.parts import AttachmentPart

    out = []
    for message in messages:
        data = message.to_dict()
        data["parts"] = [{"type": "attachment", "attachment": CarriedImage.read(p.attachment).to_wire()}
                         if isinstance(p, AttachmentPart) and p.attachment else p.to_dict() for p in message.parts]
        out.append(data)
    return out


def messages_from_wire(messages) -> list:
    """``wire_messages``' dicts back as llm Messages, each attachment a CarriedImage."""
    from llm.parts import AttachmentPart, Message, Part

    out = []
    for data in messages:
        parts = [AttachmentPart(attachment=CarriedImage.from_wire(p.get("attachment")))
                 if p.get("type") == "attachment" else Part.from_dict(p) for p in data.get("parts", [])]
        out.append(Message(role=data["role"], parts=parts, provider_metadata=data.get("provider_metadata")))
    return out
