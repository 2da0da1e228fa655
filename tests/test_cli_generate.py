"""`idefics generate`: the demo model's answers through the command line (a subprocess, as users run it), --json,
--raw, --adapter, and one-line errors with exit status 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import idefics
from idefics.cli import main

ROOT = Path(__file__).resolve().parents[1]
RED_CIRCLE = str(ROOT / "examples" / "red_circle.png")
BLUE_TRIANGLE = str(ROOT / "examples" / "blue_triangle.png")


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # a hub id must not wait on the network in a test
    return subprocess.run(
        [sys.executable, "-m", "idefics", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_generate_answers_in_a_subprocess():
    done = cli("generate", "--image", RED_CIRCLE, "What color is the shape?")
    assert (done.returncode, done.stdout, done.stderr) == (0, "Red.\n", "")


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "generate" in out and "finetune" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "no/such.png", "What?"], "image file 'no/such.png' does not exist"),
        (["--image", __file__, "What?"], "not a readable image"),
        (["--model", "./no-such-model", "What?"], "'./no-such-model' does not exist"),
        (["--model", "nobody-here/no-such-model", "What?"], "neither a local folder nor a model in the hub cache"),
        (["--image", "https://example.com/a.png", "What?"], "pass --allow-remote-images"),
    ],
)
def test_user_errors_exit_2_with_one_line(args, message):
    done = cli("generate", *args)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("idefics generate: error: ") and done.stderr.count("\n") == 1, done.stderr
    assert message in done.stderr


def test_json_output(capsys):
    assert main(["generate", "--json", "--image", BLUE_TRIANGLE, "Describe the image."]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["answer"] == "A blue triangle." and result["finish_reason"] == "stop"
    assert result["completion_tokens"] >= 2 and result["prompt_tokens"] > 5
    assert set(result["timings"]) == {"load_s", "first_token_s", "decode_s", "decode_tokens_per_s"}


def test_raw_prompt_places_images_at_their_markers(capsys):
    prompt = "User:<image>What shape is this?<end_of_utterance>\nAssistant:"
    assert main(["generate", "--raw", "--image", BLUE_TRIANGLE, prompt]) == 0
    assert capsys.readouterr().out == "A triangle.\n"
    assert main(["generate", "--raw", "--image", BLUE_TRIANGLE, "--image", RED_CIRCLE, prompt]) == 2
    assert "1 <image> markers but 2 --image given" in capsys.readouterr().err


def test_max_new_tokens_cuts_the_answer(capsys):
    assert main(["generate", "--json", "--max-new-tokens", "1", "--image", RED_CIRCLE, "Describe the image."]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["answer"], result["completion_tokens"], result["finish_reason"]) == ("A", 1, "length")


def test_bad_values_are_user_errors(capsys):
    assert main(["generate", "--max-new-tokens", "0", "Hi"]) == 2
    assert "--max-new-tokens must be at least 1" in capsys.readouterr().err
    assert main(["generate", "--adapter", "no/such/adapter", "Hi"]) == 2
    assert "adapter folder 'no/such/adapter' does not exist" in capsys.readouterr().err


def test_sampling_is_reproducible_with_a_seed(capsys):
    args = ["generate", "--temperature", "1.5", "--seed", "3", "--image", RED_CIRCLE, "Describe the image."]
    main(args)
    first = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == first


def test_adapter_changes_the_answer(tmp_path, capsys):
    from idefics import IdeficsForVisionText2Text
    from idefics.adapters import LoraConfig

    model = IdeficsForVisionText2Text.from_pretrained(idefics.DEMO_MODEL)
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj", "down_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a large update: the answer can no longer be the base model's
            p.data.normal_(0, 5.0)
    model.save_adapter(tmp_path)
    assert main(["generate", "--image", RED_CIRCLE, "What color is the shape?"]) == 0
    base = capsys.readouterr().out
    assert main(["generate", "--adapter", str(tmp_path), "--image", RED_CIRCLE, "What color is the shape?"]) == 0
    assert capsys.readouterr().out != base


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_a_user_error(capsys):
    assert main(["generate", "--device", "cuda", "Hi"]) == 2
    assert "--device 'cuda': CUDA is not available" in capsys.readouterr().err


def test_structured_output_flags(tmp_path, capsys):
    import jsonschema

    assert main(["generate", "--image", RED_CIRCLE, "--choice", "red,green,blue", "What color is the shape?"]) == 0
    assert capsys.readouterr().out.strip() == "red"
    assert main(["generate", "--image", BLUE_TRIANGLE, "--regex", "[A-Z][a-z]+[.]", "What color is the shape?"]) == 0
    assert capsys.readouterr().out.strip() == "Blue."
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    args = ["generate", "--json", "--json-schema", str(tmp_path / "schema.json"), "--image", RED_CIRCLE, "Describe."]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    jsonschema.validate(json.loads(result["answer"]), schema)
    assert result["finish_reason"] == "stop"
    assert main(["generate", "--regex", "a(b", "Hi"]) == 2
    assert capsys.readouterr().err.startswith("idefics generate: error: --regex: invalid regex")
    assert main(["generate", "--json-schema", str(tmp_path / "none.json"), "Hi"]) == 2
    assert "--json-schema: the file" in capsys.readouterr().err
