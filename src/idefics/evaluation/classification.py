"""Classification by ranking the class names' log-likelihoods after the prompt (no generation).

For each query, every class name is appended to the prompt as the answer (after "Assistant: " and followed by
`<end_of_utterance>` in instruct style, so that a name's prefix does not win) and scored by the sum of its tokens'
log-probabilities in one forward pass over a left-padded batch of (prompt + name) rows. The predicted class is the
highest-scoring name.

Legend: c class rows in a chunk, t tokens, k scored tokens (the longest name), v vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..processing.chat import END_OF_UTTERANCE


def continuation(name: str, *, style: str) -> str:
    """The text a class name is scored as, right after the prompt."""
    return f" {name}{END_OF_UTTERANCE}" if style == "instruct" else name


@torch.inference_mode()
def class_log_likelihoods(
    model, processor, prompt: list, classes: Sequence[str], *, style: str, batch_size: int = 16
) -> list[float]:
    """Summed log-probability of each class name (its continuation tokens) after `prompt`."""
    if not isinstance(prompt[-1], str):
        raise ValueError("a classification prompt must end with text (the answer's cue)")
    processor.tokenizer.padding_side = "left"  # the scored tokens are the last k of every row
    prompt_length = int(processor([prompt], add_end_of_utterance_token=False)["attention_mask"].sum())
    scores: list[float] = []
    for start in range(0, len(classes), batch_size):
        chunk = classes[start : start + batch_size]
        rows = [prompt[:-1] + [prompt[-1] + continuation(name, style=style)] for name in chunk]
        inputs = processor(rows, padding="longest", add_end_of_utterance_token=False).to(model.device)
        lengths = inputs["attention_mask"].sum(dim=1) - prompt_length  # (c,) tokens of each continuation
        if bool((lengths < 1).any()):
            bad = chunk[int((lengths < 1).nonzero()[0])]
            raise ValueError(f"class {bad!r} adds no token to the prompt")
        k = int(lengths.max())
        out = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs["pixel_values"].to(model.dtype),
            image_attention_mask=inputs["image_attention_mask"],
            logits_to_keep=k + 1,
        )
        logprobs = out.logits[:, :-1].float().log_softmax(dim=-1)  # (c, k, v): predictions of the last k tokens
        targets = inputs["input_ids"][:, -k:]  # (c, k)
        picked = logprobs.gather(-1, targets[..., None]).squeeze(-1)  # (c, k)
        scored = torch.arange(k, device=picked.device)[None, :] >= (k - lengths)[:, None]  # (c, k) own tokens only
        scores += (picked * scored).sum(dim=1).tolist()
    return scores


def predict_class(model, processor, prompt: list, classes: Sequence[str], *, style: str, batch_size: int = 16) -> str:
    """The class name with the highest log-likelihood after `prompt`."""
    scores = class_log_likelihoods(model, processor, prompt, classes, style=style, batch_size=batch_size)
    return classes[max(range(len(classes)), key=scores.__getitem__)]
