"""`idefics serve`'s flags reach the engine: a quantised demo model behind it still answers right."""

import pytest
from PIL import Image
from server_process import EXAMPLES

from idefics.cli import build_parser
from idefics.cli.errors import UserError
from idefics.cli.serve import build_engine
from idefics.quantization.linear import QuantizedLinear
from idefics.serving import SamplingParams


def test_quantize_flag_serves_a_quantised_model():
    args = build_parser().parse_args(["serve", "--quantize", "int8", "--max-batch-size", "2"])
    engine, processor = build_engine(args)
    assert any(isinstance(m, QuantizedLinear) for m in engine.model.modules())
    question = [{"role": "user", "content": [{"type": "image", "image": Image.open(EXAMPLES / "red_circle.png")},
                                             {"type": "text", "text": "What color is the shape?"}]}]  # fmt: skip
    eou = processor.tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    with engine:
        (answer,) = engine.submit(question, SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[eou])).result()
    assert answer.text.strip() == "Red."


def test_bad_group_size_is_a_user_error():
    args = build_parser().parse_args(["serve", "--quantize", "int4", "--group-size", "0"])
    with pytest.raises(UserError, match="--group-size must be at least 1"):
        build_engine(args)


def test_cache_memory_sizes_the_slots():
    args = build_parser().parse_args(["serve", "--max-batch-size", "8", "--max-model-len", "256"])
    engine, _ = build_engine(args)
    per_slot = engine.slots.nbytes / engine.slots.num_slots
    budget_gib = 3.5 * per_slot / 2**30  # room for three slots and a half
    args = build_parser().parse_args(["serve", "--max-batch-size", "8", "--max-model-len", "256",
                                      "--cache-memory", str(budget_gib)])  # fmt: skip
    engine, _ = build_engine(args)
    assert engine.slots.num_slots == 3 and engine.stats()["slots_total"] == 3
    assert engine.slots.nbytes <= budget_gib * 2**30
    args.cache_memory = budget_gib / 4
    with pytest.raises(UserError, match="holds no slot: one takes"):
        build_engine(args)


def test_cache_flags_reach_the_engine():
    from idefics.cli.serve import check_args

    engine, _ = build_engine(build_parser().parse_args(["serve", "--max-batch-size", "2"]))
    assert engine.image_cache.max_bytes == 2**28 and engine.slots.retain  # the defaults: 0.25 GiB, prefix cache on
    args = build_parser().parse_args(["serve", "--max-batch-size", "2", "--image-cache-memory", "0.001",
                                      "--no-prefix-cache"])  # fmt: skip
    engine, _ = build_engine(args)
    assert engine.image_cache.max_bytes == int(0.001 * 2**30) and not engine.slots.retain
    engine, _ = build_engine(build_parser().parse_args(["serve", "--image-cache-memory", "0"]))
    assert engine.image_cache is None and engine.stats()["image_cache"]["max_bytes"] == 0
    with pytest.raises(UserError, match="--image-cache-memory must be >= 0"):
        check_args(build_parser().parse_args(["serve", "--image-cache-memory", "-1"]))
