"""`--quantize` on the command line: `idefics generate` answers with a quantised demo model whatever the group
size (the README's command included), `--quantize-strict` turns a group size that does not divide a layer into a
one-line error, and `idefics finetune`, `serve` and `eval` carry the flags on."""

import json
import logging
from pathlib import Path

import pytest

from idefics.cli import build_parser, main
from idefics.cli.finetune import config_from_args

RED_CIRCLE = str(Path(__file__).resolve().parents[2] / "examples" / "red_circle.png")


@pytest.mark.parametrize(
    ("flags", "summary"),
    [
        (["--quantize", "int8"], None),
        (["--quantize", "int4"], "int4 group_size 128 does not divide 28 of 52 layers: 24 took group size 64 (in "
         "features 64), 4 stayed int8 (in features 336); quantize_strict=True (--quantize-strict) refuses them "
         "instead"),
        (["--quantize", "int4", "--group-size", "32"], "int4 group_size 32 does not divide 4 of 52 layers: 4 stayed "
         "int8 (in features 336)"),
        (["--quantize", "int4", "--group-size", "16", "--quantize-strict"], None),  # 16 divides every layer
    ],
)  # fmt: skip
def test_generate_with_a_quantised_model(flags, summary, capsys, caplog):
    with caplog.at_level(logging.WARNING):
        assert main(["generate", "--json", *flags, "--image", RED_CIRCLE, "What color is the shape?"]) == 0
    assert json.loads(capsys.readouterr().out)["answer"] == "Red."
    lines = [record.getMessage() for record in caplog.records]
    assert lines == [] if summary is None else len(lines) == 1 and lines[0].startswith(summary)


def test_the_readme_command_answers():
    """`idefics generate --quantize int4 --image examples/red_circle.png "What color is the shape?"` as a user runs it:
    a process of its own, the answer on stdout, the one summary line on stderr."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "idefics", "generate", "--quantize", "int4", "--image", "examples/red_circle.png",
               "What color is the shape?"]  # fmt: skip
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stdout) == (0, "Red.\n"), done.stderr
    assert done.stderr.startswith("int4 group_size 128 does not divide 28 of 52 layers: 24 took group size 64")
    assert done.stderr.count("\n") == 1


def test_generate_strict_group_size_that_does_not_fit_is_a_one_line_error(capsys):
    argv = ["generate", "--quantize", "int4", "--quantize-strict", "--image", RED_CIRCLE, "What?"]
    for extra in ([], ["--group-size", "256"]):
        assert main([*argv, *extra]) == 2
        err = capsys.readouterr().err
        size = extra[-1] if extra else "128"
        assert err.startswith(f"idefics generate: error: int4 group_size {size} does not divide layer 'model.vision")
        assert "(in features 64" in err and err.count("\n") == 1
    assert main([*argv, "--group-size", "32"]) == 2
    err = capsys.readouterr().err
    assert "int4 group_size 32 does not divide layer 'model.layers.0.mlp.down_proj' (in features 336" in err


def test_serve_answers_with_int4_and_eval_takes_the_flag(tmp_path):
    from PIL import Image

    from idefics.cli.errors import UserError
    from idefics.cli.serve import build_engine
    from idefics.evaluation.run import EvalConfig, load
    from idefics.quantization import QuantizationError
    from idefics.serving import SamplingParams

    parser = build_parser()
    for command in (["serve"], ["eval", "--task", "vqa", "--output", "o"]):
        args = parser.parse_args([*command, "--quantize", "int4", "--quantize-strict"])
        assert (args.quantize, args.group_size, args.quantize_strict) == ("int4", 128, True)
        assert parser.parse_args([*command, "--quantize", "int4"]).quantize_strict is False
    with pytest.raises(UserError, match="int4 group_size 128 does not divide layer 'model.vision_model"):
        build_engine(parser.parse_args(["serve", "--quantize", "int4", "--quantize-strict"]))
    engine, processor = build_engine(parser.parse_args(["serve", "--quantize", "int4", "--max-batch-size", "2"]))
    question = [{"role": "user", "content": [{"type": "image", "image": Image.open(RED_CIRCLE)},
                                             {"type": "text", "text": "What color is the shape?"}]}]  # fmt: skip
    eou = processor.tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    with engine:
        (answer,) = engine.submit(question, SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[eou])).result()
    assert answer.text.strip() == "Red."
    config = EvalConfig(task="vqa", output=str(tmp_path), questions="q.json", annotations="a.json", images="img",
                        quantize="int4", quantize_strict=True, device="cpu")  # fmt: skip
    with pytest.raises(QuantizationError, match="int4 group_size 128 does not divide layer 'model.vision_model"):
        load(config)  # the demo model


def test_finetune_flags_reach_the_config():
    import argparse

    from idefics.cli import finetune

    parser = argparse.ArgumentParser()
    finetune.add_parser(parser.add_subparsers())
    args = parser.parse_args(["finetune", "--model", "m", "--data", "d", "--output", "o", "--quantize", "int4",
                              "--group-size", "64"])  # fmt: skip
    config = config_from_args(args)
    assert (config.quantize, config.group_size, config.quantize_strict, config.full) == ("int4", 64, False, False)
    args = parser.parse_args(["finetune", "--model", "m", "--data", "d", "--output", "o", "--quantize", "int4",
                              "--quantize-strict"])  # fmt: skip
    assert config_from_args(args).quantize_strict is True
    args = parser.parse_args(
        ["finetune", "--model", "m", "--data", "d", "--output", "o", "--quantize", "nf4", "--full"]
    )
    with pytest.raises(ValueError, match="trains LoRA adapters only"):
        config_from_args(args)
