"""The IDEFICS (LLaMA) tokenizer: a thin wrapper over a `tokenizers.Tokenizer` read from `tokenizer.json`.

The special tokens and padding side come from `tokenizer_config.json` and `special_tokens_map.json`; what
`add_special_tokens=True` adds is the post-processor of `tokenizer.json` (transformers also ignores `add_bos_token`
when that file exists). The extra tokens (`<fake_token_around_image>`, `<image>`, `<end_of_utterance>`) are read
from either spelling: `additional_special_tokens` (2023 hub files) or `extra_special_tokens` (transformers 5).
"""

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer

from .hub import resolve_folder

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE)
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


class BatchEncoding(dict):
    """A dict of model inputs whose entries are also attributes; `.to()` moves (or casts) the tensors."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, target: torch.device | str | torch.dtype) -> "BatchEncoding":
        """Move every tensor to a device, or cast the floating-point ones (`pixel_values`) to a dtype."""
        if isinstance(target, torch.dtype):
            return BatchEncoding(
                {
                    k: v.to(target) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                    for k, v in self.items()
                }
            )
        return BatchEncoding({k: v.to(target) if isinstance(v, torch.Tensor) else v for k, v in self.items()})


def _token_text(value: str | dict | None) -> str | None:
    """Config files store a token as its text or as a serialised AddedToken (`{"content": ...}`)."""
    return value["content"] if isinstance(value, dict) else value


class IdeficsTokenizer:
    """Text to ids and back; the special tokens and padding side of the IDEFICS checkpoints."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        bos_token: str | None = "<s>",
        eos_token: str | None = "</s>",
        unk_token: str | None = "<unk>",
        pad_token: str | None = None,
        extra_special_tokens: Sequence[str] = (),
        padding_side: str = "left",
        truncation_side: str = "right",
        model_max_length: int | None = None,
    ):
        for name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if side not in ("left", "right"):
                raise ValueError(f"{name} must be 'left' or 'right', got {side!r}")
        self._tokenizer = tokenizer
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        self.extra_special_tokens = list(dict.fromkeys(extra_special_tokens))
        self.padding_side, self.truncation_side = padding_side, truncation_side
        self.model_max_length = model_max_length
        missing = [t for t in self.all_special_tokens if tokenizer.token_to_id(t) is None]
        if missing:  # named in the config but not in tokenizer.json: appended as new special tokens
            tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])

    # --- loading and saving ---

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, *, revision: str | None = None):
        """Load `tokenizer.json` (+ `tokenizer_config.json`, `special_tokens_map.json`) from a folder or hub id."""
        folder = resolve_folder(path_or_hub_id, filenames=FILES, revision=revision)
        if not (folder / TOKENIZER_FILE).is_file():
            raise FileNotFoundError(f"{folder} has no {TOKENIZER_FILE}")
        config = _read_json(folder / TOKENIZER_CONFIG_FILE)
        config.update({k: v for k, v in _read_json(folder / SPECIAL_TOKENS_FILE).items() if v is not None})
        extra = []
        for key in ("additional_special_tokens", "extra_special_tokens"):
            value = config.get(key) or []
            extra += list(value.values()) if isinstance(value, dict) else value  # a dict maps names to tokens
        max_length = config.get("model_max_length")
        return cls(
            Tokenizer.from_file(str(folder / TOKENIZER_FILE)),
            **{name: _token_text(config.get(name)) for name in NAMED_SPECIAL_TOKENS},
            extra_special_tokens=[_token_text(t) for t in extra],
            padding_side=config.get("padding_side", "left"),
            truncation_side=config.get("truncation_side", "right"),
            model_max_length=int(max_length) if max_length is not None and max_length < 1e18 else None,
        )

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` (the 2023 hub layout)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._tokenizer.save(str(folder / TOKENIZER_FILE))
        named = {name: getattr(self, name) for name in NAMED_SPECIAL_TOKENS if getattr(self, name) is not None}
        special = {**named, "additional_special_tokens": self.extra_special_tokens}
        config = {
            **special,
            "tokenizer_class": "LlamaTokenizer",
            "padding_side": self.padding_side,
            "truncation_side": self.truncation_side,
            "clean_up_tokenization_spaces": False,
            **({"model_max_length": self.model_max_length} if self.model_max_length is not None else {}),
        }
        (folder / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        (folder / SPECIAL_TOKENS_FILE).write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")

    # --- vocabulary ---

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> Tokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tokenizer

    @property
    def all_special_tokens(self) -> list[str]:
        named = [getattr(self, name) for name in NAMED_SPECIAL_TOKENS]
        return list(dict.fromkeys(t for t in named + self.extra_special_tokens if t is not None))

    @property
    def all_special_ids(self) -> list[int]:
        return [self.convert_tokens_to_ids(t) for t in self.all_special_tokens]

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.convert_tokens_to_ids(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.convert_tokens_to_ids(self.eos_token)

    @property
    def unk_token_id(self) -> int | None:
        return None if self.unk_token is None else self.convert_tokens_to_ids(self.unk_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self.convert_tokens_to_ids(self.pad_token)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int] | None:
        """Token(s) to id(s); an unknown token gives the unknown token's id (None without one)."""
        if isinstance(tokens, str):
            token_id = self._tokenizer.token_to_id(tokens)
            return token_id if token_id is not None else self._tokenizer.token_to_id(self.unk_token or "")
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(
        self, ids: int | Sequence[int], *, skip_special_tokens: bool = False
    ) -> str | None | list[str | None]:
        """Id(s) to token string(s), e.g. `'▁cat'` or `'<0x0A>'`, for incremental detokenisation."""
        if isinstance(ids, int):
            return self._tokenizer.id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tokenizer.id_to_token(int(i)) for i in ids if int(i) not in skip]

    def add_tokens(self, tokens: str | Sequence[str], *, special: bool = False) -> int:
        """Add tokens to the vocabulary (special ones are never split and can be skipped when decoding).

        Returns how many were new. Special tokens also join `extra_special_tokens`.
        """
        tokens = [tokens] if isinstance(tokens, str) else list(tokens)
        added = [AddedToken(t, special=special, normalized=not special) for t in tokens]
        count = self._tokenizer.add_special_tokens(added) if special else self._tokenizer.add_tokens(added)
        if special:
            self.extra_special_tokens = list(dict.fromkeys(self.extra_special_tokens + tokens))
        return count

    # --- encoding and decoding ---

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int] | torch.Tensor, *, skip_special_tokens: bool = False) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(
        self, sequences: Sequence[Sequence[int]] | torch.Tensor, *, skip_special_tokens=False
    ) -> list[str]:
        sequences = sequences.tolist() if isinstance(sequences, torch.Tensor) else [list(s) for s in sequences]
        return self._tokenizer.decode_batch(sequences, skip_special_tokens=skip_special_tokens)

    def __call__(
        self,
        text: str | Sequence[str],
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
    ) -> BatchEncoding:
        """Encode a string or a batch: `input_ids` and `attention_mask`, lists or (with "pt") tensors (b, t).

        padding: False / "do_not_pad", True / "longest", or "max_length"; sides as `padding_side` and
        `truncation_side`. `truncation` cuts to `max_length` (default `model_max_length`).
        """
        single = isinstance(text, str)
        ids = self.encode_batch([text] if single else text, add_special_tokens=add_special_tokens)
        if truncation and (limit := max_length or self.model_max_length) is not None:
            ids = [s[:limit] if self.truncation_side == "right" else s[len(s) - min(len(s), limit) :] for s in ids]
        ids, mask = self.pad(ids, padding=padding, max_length=max_length)
        if return_tensors == "pt":
            if len({len(s) for s in ids}) > 1:
                raise ValueError("sequences of different lengths cannot form a tensor; pass padding='longest'")
            return BatchEncoding(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
        if return_tensors is not None:
            raise ValueError(f"only return_tensors='pt' or None are supported, got {return_tensors!r}")
        return BatchEncoding(input_ids=ids[0] if single else ids, attention_mask=mask[0] if single else mask)

    def pad(
        self, ids: list[list[int]], *, padding: bool | str = "longest", max_length: int | None = None
    ) -> tuple[list[list[int]], list[list[int]]]:
        """Pad id lists on `padding_side` with the pad token; returns (ids, attention masks)."""
        if padding in (False, "do_not_pad"):
            return ids, [[1] * len(s) for s in ids]
        if padding in (True, "longest"):
            target = max(len(s) for s in ids)
        elif padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            longest = max(range(len(ids)), key=lambda i: len(ids[i]))
            if len(ids[longest]) > max_length:
                raise ValueError(
                    f"text {longest} has {len(ids[longest])} tokens, more than max_length={max_length};"
                    " pass truncation=True to cut it"
                )
            target = max_length
        else:
            raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        if self.pad_token_id is None and any(len(s) < target for s in ids):
            raise ValueError("the tokenizer has no pad token; set pad_token to pad a batch")
        padded, masks = [], []
        for s in ids:
            fill = target - len(s)
            pad, ones = [self.pad_token_id] * fill, [1] * len(s)
            padded.append(pad + s if self.padding_side == "left" else s + pad)
            masks.append([0] * fill + ones if self.padding_side == "left" else ones + [0] * fill)
        return padded, masks


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
