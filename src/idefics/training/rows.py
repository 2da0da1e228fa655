"""One row of fine-tuning data (a JSONL object or a `datasets` row) to token ids, labels and image sources.

The text of a row is exactly what `IdeficsProcessor` builds for the row's prompt; it is encoded once, and a token is
labelled when its character span overlaps a labelled span of that text. So `input_ids` equal the processor's and
the labels line up with them by construction.
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..processing.chat import END_OF_UTTERANCE, Text, apply_chat_template
from ..processing.fetch import is_url
from ..processing.image import describe, pil_to_rgb
from ..processing.processor import FAKE_IMAGE_TOKEN, IMAGE_TOKEN, IdeficsProcessor
from .row_images import DatasetImage, ImageSource, decode_cell, open_image

LOSS_ON = ("completion", "all")
COMPLETION_ENDS = ("eos", "end_of_utterance")
REMOTE_REFUSED = "remote image not allowed, pass --allow-remote-images"
# Stands in for every image while the text is built: the text does not depend on the image itself.
PLACEHOLDER = Image.new("RGB", (1, 1))


class BadRow(ValueError):
    """A row that cannot be used; its message is the reason reported for it."""


@dataclass
class Row:
    """A validated row, unpadded; its images are loaded again when the example is built."""

    input_ids: torch.Tensor  # (t,) int64
    labels: torch.Tensor  # (t,) int64, -100 where no loss
    images: list[ImageSource]
    cut_from: int | None = None  # the length before the text was cut to max_length


@dataclass
class _Pool:
    """A row's "images" list, taken in order by image parts that hold no image themselves."""

    values: list
    used: int = 0

    @classmethod
    def of(cls, row: dict) -> "_Pool":
        values = row.get("images") if row.get("texts") is None else None  # interleaved rows align theirs
        if values is not None and not isinstance(values, list):
            raise BadRow(f"'images' must be a list, got {describe(values)}")
        return cls(values or [])

    def take(self, label: str) -> tuple[object, int]:
        """The next image value and its position in the list."""
        if self.used >= len(self.values):
            raise BadRow(f"{label}: an image part with no image, and 'images' holds only {len(self.values)}")
        self.used += 1
        return self.values[self.used - 1], self.used - 1

    def check_all_used(self) -> None:
        if self.used != len(self.values):
            raise BadRow(f"'images' holds {len(self.values)} images but the row uses {self.used}")


@dataclass
class RowReader:
    """Reads rows of three styles (see `idefics.training.data`) and checks every image they name."""

    processor: IdeficsProcessor
    max_length: int
    loss_on: str = "completion"  # "completion": assistant replies / completions; "all": every text token
    completion_end: str = "eos"  # the labelled token ending prompt/completion and interleaved rows
    allow_remote_images: bool = False
    folder: Path = Path(".")  # relative image paths start here
    _unlabelled: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"loss_on must be one of {LOSS_ON}, got {self.loss_on!r}")
        if self.completion_end not in COMPLETION_ENDS:
            raise ValueError(f"completion_end must be one of {COMPLETION_ENDS}, got {self.completion_end!r}")
        if self.completion_end == "eos" and self.processor.tokenizer.eos_token is None:
            raise ValueError("completion_end='eos' but the tokenizer has no EOS token")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        tokenizer = self.processor.tokenizer
        special = (tokenizer.bos_token_id, tokenizer.pad_token_id, self.processor.image_token_id)
        fake = tokenizer.convert_tokens_to_ids(FAKE_IMAGE_TOKEN)
        self._unlabelled = torch.tensor([i for i in (*special, fake) if i is not None])

    @property
    def end_token(self) -> str:
        return self.processor.tokenizer.eos_token if self.completion_end == "eos" else END_OF_UTTERANCE

    def read(self, row: object) -> Row:
        """One row (a JSON object or a `datasets` row) to a `Row`; raises `BadRow` with the reason."""
        if not isinstance(row, dict):
            raise BadRow(f"expected an object, got {describe(row)}")
        styles = [key for key in ("messages", "prompt", "texts") if row.get(key) is not None]
        if len(styles) != 1:
            found = "none" if not styles else " and ".join(repr(s) for s in styles)
            raise BadRow(
                f"expected exactly one of 'messages', 'prompt' (with 'completion') or 'texts' (with 'images'),"
                f" found {found}"
            )
        read = {"messages": self._chat, "prompt": self._completion, "texts": self._interleaved}[styles[0]]
        try:
            text, spans, sources = read(row, _Pool.of(row))
        except BadRow:
            raise
        except (TypeError, ValueError) as err:  # the chat template's and the processor's errors name the item
            raise BadRow(str(err)) from err
        return self._encode(text, spans, sources)

    # -- the three row styles: each returns the processor's text, its labelled character spans, image sources --

    def _chat(self, row: dict, pool: _Pool) -> tuple[str, list[tuple[int, int]], list[ImageSource]]:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise BadRow(f"'messages' must be a non-empty list, got {describe(messages)}")
        resolved, sources = [], []
        for m, message in enumerate(messages):
            if not isinstance(message, dict):
                raise BadRow(f"message {m}: expected a dict with 'role' and 'content', got {describe(message)}")
            content = message.get("content")
            if isinstance(content, list):
                content = list(content)
                for p, part in enumerate(content):
                    source = self._image_part(part, label=f"message {m}, part {p}", pool=pool)
                    if source is not None:
                        sources.append(source)
                        content[p] = {"type": "image", "image": PLACEHOLDER}
            resolved.append({"role": message.get("role"), "content": content})
        pool.check_all_used()
        text = self._text(apply_chat_template(resolved, add_generation_prompt=False))
        if self.loss_on == "all":
            return text, [(0, len(text))], sources
        spans = []
        for m, message in enumerate(resolved):
            if message["role"] != "assistant":
                continue
            # The template only appends, so the text up to this turn is a prefix of the whole text.
            prefix = self._text(apply_chat_template(resolved[: m + 1], add_generation_prompt=False))
            content = message["content"]
            reply = content if isinstance(content, str) else "".join(part["text"] for part in content)
            labelled = f" {reply}{END_OF_UTTERANCE}"  # after "Assistant:", up to the newline that ends the turn
            start, end = len(prefix) - 1 - len(labelled), len(prefix) - 1
            if not text.startswith(prefix) or text[start:end] != labelled:
                raise RuntimeError(f"message {m}: the chat text does not hold the assistant reply where expected")
            spans.append((start, end))
        if not spans:
            raise BadRow("no assistant message: nothing to learn from")
        return text, spans, sources

    def _completion(self, row: dict, pool: _Pool) -> tuple[str, list[tuple[int, int]], list[ImageSource]]:
        prompt, completion = row["prompt"], row.get("completion")
        if not isinstance(completion, str) or not completion.strip():
            raise BadRow(f"'completion' must be a non-empty string, got {describe(completion)}")
        if isinstance(prompt, str):
            prompt = [prompt]
        if not isinstance(prompt, list):
            raise BadRow(f"'prompt' must be a string or a list of items, got {describe(prompt)}")
        items, sources = [], []
        for i, item in enumerate(prompt):
            label = f"prompt item {i}"
            source = self._image_part(item, label=label, pool=pool)
            if source is not None:
                sources.append(source)
                items.append(PLACEHOLDER)
            elif isinstance(item, str):
                items.append(Text(item))
            elif isinstance(item, dict) and item.get("type") == "text" and isinstance(item.get("text"), str):
                items.append(Text(item["text"]))
            else:
                raise BadRow(f"{label}: expected a string, a text part or an image part, got {describe(item)}")
        pool.check_all_used()
        labelled = _append(items, completion + self.end_token)
        text = self._text(items)
        if not text.endswith(labelled):
            raise RuntimeError("the prompt text does not end with the completion")
        return text, [(0 if self.loss_on == "all" else len(text) - len(labelled), len(text))], sources

    def _interleaved(self, row: dict, pool: _Pool) -> tuple[str, list[tuple[int, int]], list[ImageSource]]:
        texts, images = row["texts"], row.get("images")
        if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
            raise BadRow(
                f"'texts' and 'images' must be lists of the same length, got {describe(texts)} and {describe(images)}"
            )
        items, sources = [], []
        for i, (text, image) in enumerate(zip(texts, images, strict=True)):
            if (text is None) == (image is None):
                found = "both" if text is not None else "neither"
                raise BadRow(f"position {i}: expected a text or an image, got {found}")
            if image is not None:
                sources.append(self._image(image, label=f"images[{i}]", cell=DatasetImage(i)))
                items.append(PLACEHOLDER)
            elif isinstance(text, str):
                items.append(Text(text))
            else:
                raise BadRow(f"texts[{i}]: expected a string, got {describe(text)}")
        _append(items, self.end_token)
        text = self._text(items)
        return text, [(0, len(text))], sources

    # -- helpers --

    def _text(self, items: list) -> str:
        """The text the processor builds for a prompt (BOS, image tokens, end-of-utterance tokens)."""
        text, _ = self.processor._build_text(
            items, index=0, add_eos_token=False, add_end_of_utterance_token=self.processor.add_end_of_utterance_token
        )
        return text

    def _image_part(self, part: object, *, label: str, pool: _Pool) -> ImageSource | None:
        """The source of an image part (`{"type": "image" | "image_url", ...}`), None for any other item."""
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            value = part.get("image") if part.get("image") is not None else part.get("url")
        elif kind == "image_url":
            value = part.get("image_url")
            value = value.get("url") if isinstance(value, dict) else value
        else:
            return None
        if value is None:  # the next image of the row's "images" list (the TRL / llava-instruct convention)
            value, position = pool.take(label)
            return self._image(value, label=f"{label} (images[{position}])", cell=DatasetImage(position))
        return self._image(value, label=label, cell=None)

    def _image(self, value: object, *, label: str, cell: DatasetImage | None) -> ImageSource:
        """Resolve one image value and check that it decodes within the limits; returns how to load it again.

        `cell`: where the value sits in the row's "images" list, to read a `datasets` image from the row again.
        """
        image_processor = self.processor.image_processor
        max_bytes = image_processor.url_policy.max_bytes
        try:
            if isinstance(value, dict) and value.get("bytes") is None and isinstance(value.get("path"), str):
                value = value["path"]  # an undecoded `datasets` cell that only names a file
            if isinstance(value, str) and not value.startswith("data:") and is_url(value):
                if not self.allow_remote_images:
                    raise BadRow(f"{label}: {REMOTE_REFUSED}")
                source = image = self._shrink(image_processor.load([value], labels=[label])[0])
            elif isinstance(value, str):
                source = value if value.startswith("data:") else self._path(value)
                if isinstance(source, Path) and not source.is_file():
                    raise BadRow(f"{label}: image file not found: {source}")
                image = open_image(source, max_bytes=max_bytes)
            elif isinstance(value, Image.Image | dict):
                image = decode_cell(value, max_bytes=max_bytes)
                source = cell if cell is not None else self._shrink(image)  # nothing to read again: keep it small
            else:
                raise BadRow(f"{label}: expected an image path, a data URL or an http(s) URL, got {describe(value)}")
            image_processor.pixel_values([image], labels=[label])  # decodes it fully: corrupt data fails now
        except BadRow:
            raise
        except (OSError, ValueError) as err:
            raise BadRow(str(err) if str(err).startswith(label) else f"{label}: {err}") from err
        return source

    def _path(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.folder / path

    def _shrink(self, image: Image.Image) -> Image.Image:
        """The image resized as the image processor resizes it; resizing it again to the same size is exact."""
        size = self.processor.image_processor.image_size
        return pil_to_rgb(image).resize((size, size), resample=self.processor.image_processor.resample)

    def _encode(self, text: str, spans: list[tuple[int, int]], sources: list[ImageSource]) -> Row:
        """Encode the text as the processor does; label the tokens that overlap a span; apply max_length."""
        encoding = self.processor.tokenizer.backend.encode(text, add_special_tokens=False)
        input_ids = torch.tensor(encoding.ids, dtype=torch.long)  # (t,)
        offsets = torch.tensor(encoding.offsets, dtype=torch.long).view(-1, 2)  # (t, 2) character spans
        labelled = torch.zeros(len(input_ids), dtype=torch.bool)
        for start, end in spans:
            labelled |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
        labelled &= ~torch.isin(input_ids, self._unlabelled)
        labels = torch.where(labelled, input_ids, -100)  # (t,)
        cut_from = None
        if len(input_ids) > self.max_length:
            image_at = (input_ids == self.processor.image_token_id).nonzero().flatten().tolist()
            dropped = [k for k, position in enumerate(image_at) if position >= self.max_length]
            if dropped:
                raise BadRow(
                    f"{len(input_ids)} tokens, over max_length={self.max_length}, and cutting the text would drop"
                    f" image {dropped[0]} (its {IMAGE_TOKEN} is token {image_at[dropped[0]]})"
                )
            cut_from = len(input_ids)
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        if not (labels[1:] != -100).any():  # the first token is never predicted
            within = f" within max_length={self.max_length} (the row has {cut_from} tokens)" if cut_from else ""
            raise BadRow(f"no token to learn from{within}")
        return Row(input_ids, labels, sources, cut_from)


def _append(items: list, tail: str) -> str:
    """Append `tail` to the last text item (or as a new one); returns what the processor keeps of it at the end."""
    last = items.pop() if items and isinstance(items[-1], Text) else ""
    items.append(Text(last + tail))
    return items[-1].strip(" ")[-len(tail) :]
