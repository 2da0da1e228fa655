"""`idefics finetune` as people run it: flags and recipes, one-line errors, SIGTERM, and torchrun with 2 processes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from finetune_fixture import assert_weights_close
from safetensors.torch import load_file

from idefics.cli import main
from idefics.training import checkpoint as ckpt

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def base_args(env, output) -> list[str]:
    model_dir, train, _ = env
    return ["finetune", "--model", str(model_dir), "--data", str(train), "--output", str(output), "--max-length", "64"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lr", "-1"], "lr must be positive"),
        (["--lora-dropout", "1.5"], "lora_dropout"),
        (["--max-steps", "2", "--epochs", "1"], "max_steps or epochs"),
        (["--from-scratch"], "--full"),
        (["--max-steps", "1", "--lora-targets", "no_such_module"], "no_such_module"),
    ],
)
def test_bad_values_are_one_line_errors(finetune_env, tmp_path, capsys, extra, message):
    assert main(base_args(finetune_env, tmp_path / "o") + extra) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the data report, if the data was read
    assert last.startswith("idefics finetune: error:") and message in last


def test_missing_files_are_one_line_errors(finetune_env, tmp_path, capsys):
    model_dir, train, _ = finetune_env
    args = ["finetune", "--data", str(train), "--output", str(tmp_path / "o"), "--max-steps", "1"]
    assert main([*args, "--model", str(tmp_path / "no-model")]) == 2
    assert "no-model" in capsys.readouterr().err
    args = ["finetune", "--model", str(model_dir), "--output", str(tmp_path / "o"), "--max-steps", "1"]
    assert main([*args, "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: x\ndata: y\noutput: z\nlearning_rate: 3\n")
    assert main(["finetune", "--config", str(recipe)]) == 2
    assert "learning_rate" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse's own exit for unknown flags
        main([*base_args(finetune_env, tmp_path / "o"), "--no-such-flag"])
    assert exit_info.value.code == 2


def test_recipe_and_flags_combine(finetune_env, tmp_path):
    model_dir, train, _ = finetune_env
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {model_dir}\ndata: {train}\noutput: {tmp_path / 'out'}\nmax-length: 64\nmax_steps: 5\n"
        "lora_r: 2\nlora-targets: q_proj,v_proj\nmodules_to_save: lm_head.additional_fc\n"
    )
    assert main(["finetune", "--config", str(recipe), "--max-steps", "1", "--lora-alpha", "4"]) == 0
    config = json.loads((tmp_path / "out" / "finetune_config.json").read_text())
    assert config["max_steps"] == 1 and config["lora_r"] == 2 and config["lora_alpha"] == 4.0
    assert config["modules_to_save"] == ["lm_head.additional_fc"]
    adapter = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (
        adapter["r"] == 2 and adapter["lora_alpha"] == 4 and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    )


def _wait_for_steps(path: Path, proc: subprocess.Popen, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and len(path.read_text().splitlines()) >= count:
            return
        if proc.poll() is not None:
            raise AssertionError(f"finetune exited early: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no training step was logged in time")


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(finetune_env, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "idefics", *base_args(finetune_env, out), "--max-steps", "100000", "--lora-r", "2"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_steps(out / "metrics.jsonl", proc, 2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    saved = ckpt.latest(out)
    assert saved is not None and "resume with --resume" in stdout
    step = int(saved.name.split("-")[1])
    assert step >= 2 and json.loads((saved / ckpt.STATE_FILE).read_text())["step"] == step
    assert not (out / "adapter_model.safetensors").exists()  # a stopped run has no final output yet


def test_kill_9_leaves_a_resumable_run(finetune_env, tmp_path):
    """SIGKILL while checkpoints are written every step: whatever is on disk, --resume picks a complete checkpoint
    and finishes the run."""
    out = tmp_path / "out"
    args = [*base_args(finetune_env, out), "--max-steps", "40", "--lora-r", "2", "--save-every", "1", "--keep", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "idefics", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    _wait_for_steps(out / "metrics.jsonl", proc, 3)
    proc.kill()
    proc.communicate(timeout=60)
    assert ckpt.latest(out) is not None and not (out / "adapter_model.safetensors").exists()
    done = subprocess.run([sys.executable, "-m", "idefics", *args, "--resume"], env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41)) and (out / "adapter_model.safetensors").is_file()


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun is not installed next to this Python")  # fmt: skip
@pytest.mark.parametrize("full", [True, False], ids=["full", "lora"])
def test_two_processes_match_one(finetune_env, tmp_path, full):
    """torchrun --nproc_per_node=2 (gloo, FSDP2) with batch 1 x accumulation 1 per process == one process with
    batch 1 x accumulation 2: the same rows in every step, so the same losses and weights."""
    extra = ["--max-steps", "5", "--batch-size", "1", "--lr", "1e-4", "--seed", "2"]
    extra += ["--eval-data", str(finetune_env[2]), "--eval-every", "2", "--save-every", "2"]  # under FSDP too
    extra += ["--full"] if full else ["--lora-r", "4", "--lora-dropout", "0", "--lora-targets", "q_proj,v_proj,o_proj"]
    one = tmp_path / "one"
    cmd = [sys.executable, "-m", "idefics", *base_args(finetune_env, one), *extra, "--grad-accum", "2"]
    single = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    two = tmp_path / "two"
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node=2", "--standalone", "-m", "idefics"]
    multi = subprocess.run([*torchrun, *base_args(finetune_env, two), *extra, "--grad-accum", "1"],
                           env=ENV, capture_output=True, text=True)  # fmt: skip
    assert multi.returncode == 0, multi.stderr[-3000:]
    rows = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two)]
    assert [r["step"] for r in rows[1]] == [1, 2, 3, 4, 5]
    for a, b in zip(*rows, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["tokens"] == b["tokens"]
        assert a.get("eval_loss", 0) == pytest.approx(b.get("eval_loss", 0), abs=1e-5)
    assert [r["step"] for r in rows[1] if "eval_loss" in r] == [2, 4, 5]
    assert [p.name for p in ckpt.complete_checkpoints(two)] == ["checkpoint-2", "checkpoint-4"]
    if not full:  # resuming the sharded checkpoint of step 4 redoes step 5 bit for bit
        again = tmp_path / "again"
        args = [*torchrun, *base_args(finetune_env, again), *extra, "--resume", str(two / "checkpoint-4")]
        resumed = subprocess.run(args, env=ENV, capture_output=True, text=True)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        a, b = load_file(two / "adapter_model.safetensors"), load_file(again / "adapter_model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)
    name = "model.safetensors" if full else "adapter_model.safetensors"
    assert_weights_close(load_file(one / name), load_file(two / name), 1e-5)
