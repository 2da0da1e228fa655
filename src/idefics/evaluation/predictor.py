"""`predict(prompts) -> texts`: batched greedy or beam generation behind one small interface, so that the driver
does not care what runs the model (batched `generate()` today; the continuous-batching engine can take its place).

A batch is encoded by the processor with left padding; each row's continuation is decoded up to its first end
token. The padding does not change a row's result (the same prediction alone and in a batch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..generation import GenerationConfig
from ..image_cache import ImageCache
from ..processing.chat import END_OF_UTTERANCE
from ..processing.processor import FAKE_IMAGE_TOKEN, IMAGE_TOKEN

Predict = Callable[[Sequence[list]], list[str]]  # processor prompts -> generated texts, one per prompt
IMAGE_CACHE_MEMORY = 256 << 20  # bytes of encoded images kept across batches (each image encoded once per run)


def end_token_ids(tokenizer) -> list[int]:
    """`</s>` and, when the tokenizer has it, `<end_of_utterance>`."""
    tokens = [t for t in (tokenizer.eos_token, END_OF_UTTERANCE) if t and tokenizer.backend.token_to_id(t) is not None]
    return tokenizer.convert_tokens_to_ids(tokens)


class GeneratePredictor:
    """Generation with `model.generate` on left-padded batches of processor prompts."""

    def __init__(self, model, processor, *, max_new_tokens: int, num_beams: int = 1, stop_strings: Sequence[str] = (),
                 constraint=None, image_cache_memory: int = IMAGE_CACHE_MEMORY):  # fmt: skip
        tokenizer = processor.tokenizer
        tokenizer.padding_side = "left"  # every row's continuation starts at the same column
        self.model, self.processor = model, processor
        self.end_ids = end_token_ids(tokenizer)
        self.image_cache = ImageCache(image_cache_memory) if image_cache_memory else None
        self.config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            eos_token_id=self.end_ids,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.end_ids[0],
            stop_strings=list(stop_strings) or None,
            bad_words_ids=[[tokenizer.convert_tokens_to_ids(t)] for t in (IMAGE_TOKEN, FAKE_IMAGE_TOKEN)],
            constraint=constraint,
        )

    @torch.inference_mode()
    def __call__(self, prompts: Sequence[list]) -> list[str]:
        inputs = self.processor(list(prompts), padding="longest", add_end_of_utterance_token=False)
        inputs = inputs.to(self.model.device)
        pixel_values = inputs["pixel_values"].to(self.model.dtype)
        out = self.model.generate(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=pixel_values,
            image_attention_mask=inputs["image_attention_mask"],
            generation_config=self.config,
            tokenizer=self.processor.tokenizer,
            image_cache=self.image_cache,
        )  # (b, t + new)
        texts = []
        for row in out[:, inputs["input_ids"].shape[1] :].tolist():
            ends = [i for i, token in enumerate(row) if token in self.end_ids]
            texts.append(self.processor.decode(row[: ends[0]] if ends else row, skip_special_tokens=True))
        return texts


class EnginePredictor:
    """Greedy generation through the continuous-batching engine (`idefics.serving.Engine`): every prompt of a call
    is submitted at once and the engine keeps its slots full, a finished row's slot taking the next prompt.

    Prompts are encoded here exactly as `GeneratePredictor` encodes them, so both give the same answers.
    Use it as a context manager (or call `close()`): it runs the engine's thread.
    """

    def __init__(self, model, processor, *, max_new_tokens: int, stop_strings: Sequence[str] = (),
                 engine_config=None, constraint=None):  # fmt: skip
        from ..serving import Engine, EngineConfig, SamplingParams

        self.processor = processor
        config = engine_config or EngineConfig(max_batch_size=8, max_queue=256, max_images_per_request=33)
        self.engine = Engine(model, processor, config).start()
        self.params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, stop=list(stop_strings),
                                     stop_token_ids=end_token_ids(processor.tokenizer),
                                     constraint=constraint)  # fmt: skip

    def __call__(self, prompts: Sequence[list]) -> list[str]:
        encoded = [self.processor([prompt], add_end_of_utterance_token=False) for prompt in prompts]
        streams = [self.engine.submit(dict(inputs), self.params) for inputs in encoded]
        return [stream.result()[0].text for stream in streams]

    def close(self) -> None:
        self.engine.shutdown(drain=False)

    def __enter__(self) -> EnginePredictor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
