"""`--quantize` on the command line: `idefics generate` answers with a quantised demo model, a group size that
does not fit is a one-line error, and `idefics finetune` carries the flags into its config."""

import json
from pathlib import Path

import pytest

from idefics.cli import main
from idefics.cli.finetune import config_from_args

RED_CIRCLE = str(Path(__file__).resolve().parents[2] / "examples" / "red_circle.png")


@pytest.mark.parametrize("flags", [["--quantize", "int8"], ["--quantize", "int4", "--group-size", "16"]])
def test_generate_with_a_quantised_model(flags, capsys):
    assert main(["generate", "--json", *flags, "--image", RED_CIRCLE, "What color is the shape?"]) == 0
    assert json.loads(capsys.readouterr().out)["answer"] == "Red."


def test_generate_group_size_that_does_not_fit_is_a_one_line_error(capsys):
    assert main(["generate", "--quantize", "int4", "--group-size", "256", "--image", RED_CIRCLE, "What?"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("idefics generate: error: int4 group_size 256 does not divide layer 'model.vision_model")
    assert "(in features 64" in err and err.count("\n") == 1


def test_finetune_flags_reach_the_config():
    import argparse

    from idefics.cli import finetune

    parser = argparse.ArgumentParser()
    finetune.add_parser(parser.add_subparsers())
    args = parser.parse_args(["finetune", "--model", "m", "--data", "d", "--output", "o", "--quantize", "int4",
                              "--group-size", "64"])  # fmt: skip
    config = config_from_args(args)
    assert (config.quantize, config.group_size, config.full) == ("int4", 64, False)
    args = parser.parse_args(
        ["finetune", "--model", "m", "--data", "d", "--output", "o", "--quantize", "nf4", "--full"]
    )
    with pytest.raises(ValueError, match="trains LoRA adapters only"):
        config_from_args(args)
