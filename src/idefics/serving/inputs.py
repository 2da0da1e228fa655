"""Prompts to model inputs, in the submitting thread: token ids, text, interleaved text and images, or chat messages.

Legend: t prompt tokens, n images, r image size.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..image_cache import image_key


@dataclass
class PromptInputs:
    input_ids: torch.Tensor  # (1, t)
    image_inputs: dict  # pixel_values (1, n, 3, r, r) and image_attention_mask (1, t, n); empty without images
    num_images: int
    image_keys: tuple[str, ...] = ()  # each image's image-cache key (a hash of its pixels), in prompt order


def describe_prompt(prompt: object) -> str:
    return f"{type(prompt).__name__} {prompt!r}"[:120]


def encode_prompt(prompt: object, processor, *, vocab_size: int, device: torch.device) -> PromptInputs:
    """Any accepted prompt form -> PromptInputs; ValueError naming the item for anything else.

    Besides token ids, text, interleaved items and chat messages, a prompt may be one already encoded (a mapping
    such as the processor's output for one prompt): input_ids (1, t), and with images pixel_values (1, n, 3, r, r)
    and image_attention_mask (1, t, n).
    """
    if isinstance(prompt, Mapping):
        return encoded_inputs(prompt, vocab_size=vocab_size, device=device)
    if isinstance(prompt, list | tuple) and prompt and all(isinstance(x, int) and not isinstance(x, bool)
                                                           for x in prompt):  # fmt: skip
        bad = [(i, x) for i, x in enumerate(prompt) if not 0 <= x < vocab_size]
        if bad:
            i, x = bad[0]
            raise ValueError(f"prompt token {i} is {x}, outside the vocabulary [0, {vocab_size})")
        return PromptInputs(torch.tensor([list(prompt)], dtype=torch.long, device=device), {}, 0)
    if isinstance(prompt, list | tuple) and not prompt:
        raise ValueError("the prompt is empty")
    if processor is None:
        raise ValueError(f"this engine has no processor: pass the prompt as token ids, got {describe_prompt(prompt)}")
    if isinstance(prompt, list | tuple) and all(isinstance(x, dict) for x in prompt):
        try:
            items = processor.apply_chat_template(list(prompt))
        except (TypeError, KeyError) as err:
            raise ValueError(f"bad chat messages: {err}") from err
    elif isinstance(prompt, str):
        items = [prompt]
    elif isinstance(prompt, list | tuple):
        items = list(prompt)
    else:
        raise ValueError(f"a prompt must be token ids, text, a list of text and images or chat messages, got "
                         f"{describe_prompt(prompt)}")  # fmt: skip
    try:
        enc = processor(items)
    except TypeError as err:  # an unsupported item: the processor's message names it
        raise ValueError(str(err)) from err
    input_ids = enc["input_ids"]  # (1, t)
    if input_ids.shape[1] == 0:
        raise ValueError("the prompt is empty")
    num_images = int((input_ids == processor.image_token_id).sum())
    image_inputs, keys = {}, ()
    if num_images:
        pixels = enc["pixel_values"][:, :num_images]
        keys = tuple(image_key(x) for x in pixels[0])  # hashed here, in the submitting thread
        image_inputs = {
            "pixel_values": pixels.to(device),
            "image_attention_mask": enc["image_attention_mask"][:, :, :num_images].to(device),
        }
    return PromptInputs(input_ids.to(device), image_inputs, num_images, keys)


def encoded_inputs(enc: Mapping, *, vocab_size: int, device: torch.device) -> PromptInputs:
    ids = enc.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise ValueError(f"an encoded prompt needs input_ids of shape (1, tokens), got {describe_prompt(ids)}")
    if ids.dtype not in (torch.int64, torch.int32) or int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ValueError(f"input_ids must be integer ids in [0, {vocab_size})")
    padding = enc.get("attention_mask")
    if padding is not None and not bool(torch.as_tensor(padding).bool().all()):
        raise ValueError("an encoded prompt must not be padded: its attention_mask has zeros")
    pixels, mask = enc.get("pixel_values"), enc.get("image_attention_mask")
    if pixels is None:
        return PromptInputs(ids.long().to(device), {}, 0)
    if pixels.ndim != 5 or pixels.shape[0] != 1:
        raise ValueError(f"pixel_values must be (1, images, 3, height, width), got {tuple(pixels.shape)}")
    n = pixels.shape[1]
    if mask is None or tuple(mask.shape) != (1, ids.shape[1], n):
        got = None if mask is None else tuple(mask.shape)
        raise ValueError(f"image_attention_mask must be (1, tokens, images) = {(1, ids.shape[1], n)}, got {got}")
    keys = tuple(image_key(x) for x in pixels[0])
    return PromptInputs(ids.long().to(device), {"pixel_values": pixels.to(device), "image_attention_mask":
                                                mask.to(device)}, n, keys)  # fmt: skip
