"""Streaming text: token ids in, text deltas out.

`TextDeltas` turns one row's tokens into printable text as they arrive: a token whose bytes do not yet form whole
characters (byte-fallback pieces of an emoji, say) is held until they do, and a leading-space marker is kept by
decoding each new token together with the tokens before it. Text that might be the start of a stop string is held
back until it is known not to be one; the stop string itself is never emitted.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .config import GenerationConfig
from .loop import generate_steps, resolve_config
from .stopping import Detokenizer


class TextDeltas:
    def __init__(self, tokenizer: Detokenizer, *, stop_strings: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop_strings = stop_strings or []
        self.tokens: list[int] = []
        self.prefix_offset = 0  # tokens[prefix_offset:read_offset] give the context for decoding new ones
        self.read_offset = 0
        self.text = ""  # everything decoded so far
        self.emitted = 0  # characters of `text` already handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Add one token; return the text that is now safe to show (possibly empty)."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        before = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        after = self._decode(self.tokens[self.prefix_offset :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        return self._release(final=False)

    def finish(self) -> str:
        """Flush what was held back: an incomplete stop-string prefix, trailing bytes that never formed a character
        (shown as U+FFFD, as `decode` shows them)."""
        if not self.stopped:
            rest = self._decode(self.tokens[self.prefix_offset :])
            before = self._decode(self.tokens[self.prefix_offset : self.read_offset])
            if len(rest) > len(before):
                self.text += rest[len(before) :]
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        if self.stopped:
            return ""
        end = len(self.text)
        hits = [i for s in self.stop_strings if (i := self.text.find(s, max(0, self.emitted - len(s)))) >= 0]
        if hits:
            end, self.stopped = min(hits), True
        elif not final:
            end -= self._held_back()
        delta = self.text[self.emitted : max(end, self.emitted)]
        self.emitted = max(end, self.emitted)
        return delta

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that begins some stop string."""
        longest = 0
        for s in self.stop_strings:
            for n in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:n]):
                    longest = n
                    break
        return longest


def stream_generate(
    model,
    tokenizer: Detokenizer,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    generator: torch.Generator | None = None,
    **kwargs,
) -> Iterator[str]:
    """Generate for one prompt (1, t) and yield text deltas; their concatenation is the reply.

    Image inputs (pixel_values, image_attention_mask, ...) and generation settings go in kwargs, as for `generate`.
    """
    if input_ids.shape[0] != 1:
        raise ValueError(f"stream_generate takes one prompt (batch 1), got a batch of {input_ids.shape[0]}")
    image_keys = ("pixel_values", "image_encoder_embeddings", "perceiver_embeddings", "image_attention_mask",
                  "interpolate_pos_encoding", "image_cache")  # fmt: skip
    image_inputs = {k: kwargs.pop(k) for k in image_keys if k in kwargs}
    config = resolve_config(model, generation_config, kwargs)
    deltas = TextDeltas(tokenizer, stop_strings=config.stop_strings)
    for step in generate_steps(
        model,
        input_ids,
        config=config,
        tokenizer=tokenizer,
        attention_mask=attention_mask,
        generator=generator,
        **image_inputs,
    ):
        if text := deltas.push(int(step.tokens[0])):
            yield text
        if deltas.stopped:
            return
    if text := deltas.finish():
        yield text
