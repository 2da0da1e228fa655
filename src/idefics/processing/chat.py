"""The chat format of the IDEFICS instruct models, built from OpenAI-style messages.

    User:<text and images><end_of_utterance>
    Assistant: <reply><end_of_utterance>
    User:<text and images><end_of_utterance>
    Assistant:

Text right after "User:" is separated from it by one space, an image follows it directly, and a system message is
plain text on the first line(s). The example of the idefics-9b-instruct model card,

    messages = [
        {"role": "user", "content": [
            {"type": "text", "text": "What is in this image?"},
            {"type": "image_url", "image_url": {"url": "https://upload.wikimedia.org/wikipedia/commons/8/86/Id%C3%A9fix.JPG"}},
        ]},
        {"role": "assistant", "content": "This picture depicts Idefix, the dog of Obelix in Asterix and Obelix."
                                         " Idefix is running on the ground."},
        {"role": "user", "content": [
            {"type": "image", "url": "https://static.wikia.nocookie.net/asterix/images/2/25/R22b.gif/revision/latest?cb=20110815073052"},
            {"type": "text", "text": "And who is that?"},
        ]},
    ]

becomes the prompt

    ["User: What is in this image?", "https://upload.wikimedia.org/...Id%C3%A9fix.JPG",
     "<end_of_utterance>\\nAssistant: This picture depicts Idefix, ... on the ground.<end_of_utterance>\\nUser:",
     "https://static.wikia.nocookie.net/...",
     "And who is that?<end_of_utterance>\\nAssistant:"]

which the processor encodes to the same tokens as the card's hand-written prompt (given there with
`add_end_of_utterance_token=False`; this prompt never has two text items in a row, so both settings agree).
"""

from typing import Any

import numpy as np
import torch
from PIL import Image

from .fetch import UrlPolicy, decode_data_url, is_url
from .image import describe

END_OF_UTTERANCE = "<end_of_utterance>"
Message = dict[str, Any]  # {"role": "system" | "user" | "assistant", "content": str | list[dict]}


class Text(str):
    """Prompt text that the processor never reads as an image URL (chat text is the user's words, not a link)."""


def apply_chat_template(
    messages: list[Message], *, add_generation_prompt: bool = True, max_bytes: int = UrlPolicy.max_bytes
) -> list:
    """Messages to a prompt list alternating `Text` and images (http(s) URLs stay strings; `data:` URLs are
    decoded here, up to `max_bytes`). With `add_generation_prompt`, the prompt ends with "Assistant:"."""
    if not messages:
        raise ValueError("no messages given")
    items: list = []

    def add_text(text: str) -> None:
        if items and isinstance(items[-1], Text):
            items[-1] = Text(items[-1] + text)
        else:
            items.append(Text(text))

    for m, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TypeError(f"message {m}: expected a dict with 'role' and 'content', got {describe(message)}")
        role = message.get("role")
        parts = _parts(message.get("content"), index=m, max_bytes=max_bytes)
        if role == "user":
            add_text("User:")
            for i, (kind, value) in enumerate(parts):
                if kind == "text":
                    add_text(" " + value if i == 0 else value)
                else:
                    items.append(value)
            add_text(END_OF_UTTERANCE + "\n")
        elif role in ("system", "assistant"):
            if any(kind == "image" for kind, _ in parts):
                raise ValueError(f"message {m}: {role} messages can only hold text")
            text = "".join(value for _, value in parts)
            if role == "system":
                if m != 0:
                    raise ValueError(f"message {m}: a system message can only come first")
                add_text(text + "\n")
            else:
                add_text(f"Assistant: {text}{END_OF_UTTERANCE}\n")
        else:
            raise ValueError(f"message {m}: unknown role {role!r}, expected 'system', 'user' or 'assistant'")
    if add_generation_prompt:
        add_text("Assistant:")
    return items


def _parts(content: object, *, index: int, max_bytes: int) -> list[tuple[str, object]]:
    """A message's content as ("text", str) and ("image", image or URL) pairs."""
    if isinstance(content, str):
        return [("text", content)]
    if not isinstance(content, list):
        raise TypeError(f"message {index}: content must be a string or a list of parts, got {describe(content)}")
    parts = []
    for i, part in enumerate(content):
        label = f"message {index}, part {i}"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise TypeError(f"{label}: a text part needs a string 'text'")
            parts.append(("text", part["text"]))
        elif kind == "image":
            parts.append(("image", _image(part.get("image", part.get("url")), label=label, max_bytes=max_bytes)))
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            parts.append(("image", _image(url, label=label, max_bytes=max_bytes)))
        else:
            raise ValueError(f"{label}: expected a dict of type 'text', 'image' or 'image_url', got {describe(part)}")
    return parts


def _image(value: object, *, label: str, max_bytes: int) -> object:
    if isinstance(value, Image.Image | np.ndarray | torch.Tensor):
        return value
    if isinstance(value, str):
        if value.startswith("data:"):
            try:
                return decode_data_url(value, max_bytes=max_bytes)
            except ValueError as err:
                raise ValueError(f"{label}: {err}") from err
        if is_url(value):
            return value
    raise ValueError(f"{label}: expected an image, an http(s) URL or a data URL, got {describe(value)}")
