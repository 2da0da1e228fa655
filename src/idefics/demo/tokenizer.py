"""A LLaMA-style BPE tokenizer trained with the `tokenizers` library, carrying the IDEFICS special tokens.

The layout is LLaMA's, so that both our `IdeficsTokenizer` and transformers' `LlamaTokenizer` (which rebuilds its
pipeline from the vocabulary and merges) read `tokenizer.json` the same way: `<unk>`, `<s>`, `</s>` at ids 0-2, the
256 byte-fallback tokens `<0x00>`..`<0xFF>`, then the learnt pieces; Metaspace pre-tokenisation ("▁" for spaces,
prefixed to the first word only), no normaliser. Merges are learnt within words, so a piece never spans a space and
the prompt "...Assistant:" followed by the reply " Red." tokenises the same as their concatenation. The IDEFICS
tokens `<fake_token_around_image>`, `<image>`, `<end_of_utterance>` come after the vocabulary, as in the published
checkpoints: the model keeps them in its additional (decoupled) embedding rows.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from ..processing.chat import END_OF_UTTERANCE
from ..processing.processor import FAKE_IMAGE_TOKEN, IMAGE_TOKEN
from ..processing.tokenizer import IdeficsTokenizer

BASE_SPECIALS = ("<unk>", "<s>", "</s>")
IDEFICS_SPECIALS = (FAKE_IMAGE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE)
BYTE_TOKENS = tuple(f"<0x{i:02X}>" for i in range(256))


def train_tokenizer(texts: Iterable[str], *, max_pieces: int = 256) -> IdeficsTokenizer:
    """Learn up to `max_pieces` BPE pieces (characters and merges) from `texts`, which may contain the IDEFICS
    special tokens. The vocabulary (`vocab_size` of the model) is 3 + 256 + the pieces; the three IDEFICS tokens
    follow it. The pad token is `<unk>`, as in the IDEFICS checkpoints."""
    # The trainer does not split off special tokens, so the texts are cut at them here. A segment after a special
    # token gets no "▁" prefix (the processor's text always starts with "<s>"), hence prepend_scheme="never".
    specials = re.compile("|".join(re.escape(t) for t in BASE_SPECIALS + IDEFICS_SPECIALS))
    segments = (segment for text in texts for segment in specials.split(text) if segment)
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=len(BASE_SPECIALS) + max_pieces, special_tokens=list(BASE_SPECIALS), show_progress=False
    )
    learner.train_from_iterator(segments, trainer=trainer)
    learnt = json.loads(learner.to_str())["model"]
    pieces = sorted((i, p) for p, i in learnt["vocab"].items() if p not in BASE_SPECIALS + IDEFICS_SPECIALS)
    vocab = {token: i for i, token in enumerate(BASE_SPECIALS + BYTE_TOKENS + tuple(p for _, p in pieces))}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learnt["merges"]]

    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BASE_SPECIALS])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in IDEFICS_SPECIALS])
    return IdeficsTokenizer(tokenizer, pad_token="<unk>", extra_special_tokens=IDEFICS_SPECIALS)
