"""Prompts of interleaved images and text to IDEFICS model inputs: image processor, tokenizer, processor, chat."""

from .chat import Text, apply_chat_template
from .fetch import UrlPolicy
from .image import IdeficsImageProcessor
from .processor import IdeficsProcessor, image_attention_mask
from .tokenizer import BatchEncoding, IdeficsTokenizer

__all__ = [
    "BatchEncoding",
    "IdeficsImageProcessor",
    "IdeficsProcessor",
    "IdeficsTokenizer",
    "Text",
    "UrlPolicy",
    "apply_chat_template",
    "image_attention_mask",
]
