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
