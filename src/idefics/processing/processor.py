"""IdeficsProcessor: interleaved image-text prompts to model inputs, as the reference builds them.

A prompt is a list of items: text, image URLs, PIL images, numpy arrays, torch tensors. Each image becomes
`<fake_token_around_image><image><fake_token_around_image>`, consecutive images share the fake token between them,
and `<end_of_utterance>` can separate consecutive text items. With F = <fake_token_around_image>:

    ["User:", img, img, "Describe both.", "Assistant:"]
    -> "<s>User:F<image>F<image>FDescribe both.<end_of_utterance>Assistant:"

Legend: b batch, t text length, n images per prompt (the most in the batch, at least 1), r image size.
"""

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .chat import END_OF_UTTERANCE, Message, Text, apply_chat_template
from .fetch import is_url
from .hub import resolve_folder
from .image import CONFIG_NAME, PROCESSOR_CONFIG_NAME, IdeficsImageProcessor, Transform, describe
from .tokenizer import FILES, BatchEncoding, IdeficsTokenizer

FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
IMAGE_TOKEN = "<image>"
IMAGE_TYPES = (Image.Image, np.ndarray, torch.Tensor)


def image_attention_mask(
    input_ids: torch.Tensor, *, image_token_id: int, eos_token_id: int | None, num_images: int
) -> torch.Tensor:
    """Which image each token may attend to, one-hot: (b, t) ids -> (b, t, n) int64.

    A token attends to the latest image whose `<image>` token is at or before it. After an EOS, tokens attend to no
    image until the next one (the EOS itself still does):

        token   <s>  A  F  <image>  F  B  </s>  C  F  <image>  F  D
        image    -   -  -     0     0  0    0   -  -     1     1  1
    """
    b, t = input_ids.shape
    positions = torch.arange(t).expand(b, t)  # (b, t)
    is_image = input_ids == image_token_id
    last_image = torch.where(is_image, positions, -1).cummax(dim=1).values  # (b, t)
    attends = last_image >= 0
    if eos_token_id is not None:
        last_eos = torch.where(input_ids == eos_token_id, positions, -1).cummax(dim=1).values
        eos_before = F.pad(last_eos[:, :-1], (1, 0), value=-1)  # the latest EOS strictly before each token
        attends &= last_image > eos_before
    index = is_image.cumsum(dim=1) - 1  # (b, t): how many images so far, minus one
    attends &= index < num_images
    one_hot = F.one_hot(index.clamp(0, num_images - 1), num_images)  # (b, t, n)
    return one_hot * attends.unsqueeze(-1)


def _as_batch(prompts: object) -> list[list]:
    """One prompt (a list of items, or a lone string) or a batch of them, as a batch."""
    if isinstance(prompts, str):
        return [[prompts]]
    if not isinstance(prompts, list | tuple) or not prompts:
        raise ValueError(f"expected a prompt (a list of items) or a list of prompts, got {describe(prompts)}")
    if not any(isinstance(item, list | tuple) for item in prompts):
        return [list(prompts)]
    for p, prompt in enumerate(prompts):
        if not isinstance(prompt, list | tuple):
            raise TypeError(f"prompt {p}: in a batch every prompt must be a list of items, got {describe(prompt)}")
    return [list(prompt) for prompt in prompts]


class IdeficsProcessor:
    """Prompts of interleaved text and images to `input_ids`, `attention_mask`, `pixel_values` and
    `image_attention_mask`."""

    def __init__(self, image_processor: IdeficsImageProcessor, tokenizer: IdeficsTokenizer):
        for token in (IMAGE_TOKEN, FAKE_IMAGE_TOKEN):
            if tokenizer.backend.token_to_id(token) is None:
                raise ValueError(f"the tokenizer has no {token!r} token")
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    @property
    def add_end_of_utterance_token(self) -> bool:
        """The default: whether the tokenizer has `<end_of_utterance>` among its special tokens."""
        return END_OF_UTTERANCE in self.tokenizer.all_special_tokens

    def __call__(
        self,
        prompts: list | str | None = None,
        *,
        text: list | str | None = None,
        padding: bool | str = "longest",
        truncation: bool = False,
        max_length: int | None = None,
        add_eos_token: bool = False,
        add_end_of_utterance_token: bool | None = None,
        image_size: int | None = None,
        transform: Transform | None = None,
        return_tensors: str = "pt",
    ) -> BatchEncoding:
        """Encode one prompt or a batch (`text=` is an alias of `prompts`).

        Returns `input_ids` and `attention_mask` (b, t) int64, `pixel_values` (b, n, 3, r, r) float32 with zeros
        for missing images, and `image_attention_mask` (b, t, n) int64. Truncation drops the images whose `<image>`
        token was cut. Every item and argument is checked before any URL is fetched or image decoded.
        """
        if (prompts is None) == (text is None):
            raise ValueError("pass the prompts either positionally or as text=, exactly once")
        if return_tensors != "pt":
            raise ValueError(f"only return_tensors='pt' is supported, got {return_tensors!r}")
        if add_end_of_utterance_token is None:
            add_end_of_utterance_token = self.add_end_of_utterance_token
        texts, items, labels, counts = [], [], [], []  # items and labels: the images of all prompts, in order
        for p, prompt in enumerate(_as_batch(prompts if text is None else text)):
            prompt_text, prompt_images = self._build_text(
                prompt, index=p, add_eos_token=add_eos_token, add_end_of_utterance_token=add_end_of_utterance_token
            )
            texts.append(prompt_text)
            items += [item for item, _ in prompt_images]
            labels += [label for _, label in prompt_images]
            counts.append(len(prompt_images))
        encoding = self.tokenizer(
            texts,
            add_special_tokens=False,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            return_tensors="pt",
        )
        loaded = self.image_processor.load(items, labels=labels, transform=transform)
        num_images = max(1, *counts)
        kept = self._kept_images(encoding.input_ids, counts)
        kept_flat = [i for prompt_kept in kept for i in prompt_kept]
        pixels = self.image_processor.pixel_values(
            [loaded[i] for i in kept_flat],
            labels=[labels[i] for i in kept_flat],
            image_size=image_size,
            transform=transform,
        )  # (kept, 3, r, r)
        pixel_values = torch.zeros(len(texts), num_images, *pixels.shape[1:])  # (b, n, 3, r, r)
        start = 0
        for p, prompt_kept in enumerate(kept):
            pixel_values[p, : len(prompt_kept)] = pixels[start : start + len(prompt_kept)]
            start += len(prompt_kept)
        mask = image_attention_mask(
            encoding.input_ids,
            image_token_id=self.image_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            num_images=num_images,
        )
        return BatchEncoding(
            input_ids=encoding.input_ids,
            attention_mask=encoding.attention_mask,
            pixel_values=pixel_values,
            image_attention_mask=mask,
        )

    def _build_text(
        self, prompt: list, *, index: int, add_eos_token: bool, add_end_of_utterance_token: bool
    ) -> tuple[str, list[tuple[object, str]]]:
        """The prompt's text with image tokens, and its images with their labels for error messages."""
        if not prompt:
            raise ValueError(f"prompt {index} is empty")
        text, images, previous = self.tokenizer.bos_token or "", [], None
        for i, item in enumerate(prompt):
            label = f"prompt {index}, item {i}"
            if isinstance(item, str):
                is_text = isinstance(item, Text) or not is_url(item.strip(" "))
                item = item.strip(" ")  # as the reference: spaces around items are dropped, newlines kept
                if is_text:
                    if IMAGE_TOKEN in item:
                        raise ValueError(
                            f"{label}: {describe(item)} contains {IMAGE_TOKEN!r}, which would not match an image;"
                            " pass images as items of the prompt"
                        )
                    if add_end_of_utterance_token and previous == "text":
                        text += END_OF_UTTERANCE
                    text += item
                    previous = "text"
                    continue
            elif not isinstance(item, IMAGE_TYPES):
                raise TypeError(
                    f"{label}: unsupported {describe(item)}; expected text, an image URL, a PIL image,"
                    " a numpy array or a torch tensor"
                )
            text += (
                IMAGE_TOKEN + FAKE_IMAGE_TOKEN
                if previous == "image"
                else FAKE_IMAGE_TOKEN + IMAGE_TOKEN + FAKE_IMAGE_TOKEN
            )
            images.append((item, label))
            previous = "image"
        if add_eos_token:
            if self.tokenizer.eos_token is None:
                raise ValueError("add_eos_token=True but the tokenizer has no EOS token")
            text += self.tokenizer.eos_token
        return text, images

    def _kept_images(self, input_ids: torch.Tensor, counts: list[int]) -> list[list[int]]:
        """Per prompt, the flat indices of the images whose `<image>` token survived truncation."""
        survived = (input_ids == self.image_token_id).sum(dim=1).tolist()  # (b,)
        kept, start = [], 0
        for count, left in zip(counts, survived, strict=True):
            indices = list(range(start, start + count))
            kept.append(indices[count - left :] if self.tokenizer.truncation_side == "left" else indices[:left])
            start += count
        return kept

    def apply_chat_template(self, messages: list[Message], *, add_generation_prompt: bool = True) -> list:
        """OpenAI-style messages to a prompt for this processor; see `idefics.processing.chat`."""
        return apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, max_bytes=self.image_processor.url_policy.max_bytes
        )

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, *, skip_special_tokens: bool = False) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens)

    @classmethod
    def from_pretrained(
        cls, path_or_hub_id: str | os.PathLike, *, revision: str | None = None, **image_processor_kwargs
    ) -> "IdeficsProcessor":
        """Load from a folder or hub id in the 2023 hub layout (`preprocessor_config.json`, tokenizer files) or the
        transformers 5 layout (`processor_config.json` with the image processor nested).

        `image_processor_kwargs` (e.g. `url_policy`, `num_workers`) go to `IdeficsImageProcessor.from_pretrained`.
        """
        folder = resolve_folder(
            path_or_hub_id, filenames=[CONFIG_NAME, PROCESSOR_CONFIG_NAME, *FILES], revision=revision
        )
        return cls(
            IdeficsImageProcessor.from_pretrained(folder, **image_processor_kwargs),
            IdeficsTokenizer.from_pretrained(folder),
        )

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write the 2023 hub layout: `preprocessor_config.json` and the three tokenizer files."""
        self.image_processor.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
