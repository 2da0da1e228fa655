"""Tensor parallelism with 2 gloo processes under torchrun against one process: logits, greedy / beam / sampled
tokens (compiled too), each rank's share of the weights, the CLI, and the setups it refuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from idefics import DEMO_MODEL, IdeficsForVisionText2Text, IdeficsModel
from idefics.loading import load_checkpoint
from idefics.parallel import TensorParallel, TensorParallelError, apply_plan, vocab_shards
from idefics.quantization import weight_bytes

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from tp_worker import run  # noqa: E402

TORCHRUN = Path(sys.executable).with_name("torchrun")
pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to this Python")
MODELS = ["resampler_qk_interval2", "plain_vector_zeros"]  # perceiver + qk norms + extra rows; plain, 0 extra rows
RED = Path(__file__).parents[2] / "examples" / "red_circle.png"


def torchrun(*args: str, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["IDEFICS_DIST_TIMEOUT"] = "120"  # a rank that waits for a dead peer fails within the test's time
    command = [str(TORCHRUN), f"--nproc_per_node={nproc}", "--standalone", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def sharded_runs(reference_checkpoints, tmp_path_factory):
    """name -> (one-process model, its outputs, [rank 0 outputs, rank 1 outputs]) from one torchrun of both models."""
    folders = [reference_checkpoints(name)[1] for name in MODELS]
    out = tmp_path_factory.mktemp("tp-out")
    result = torchrun(str(HERE / "tp_worker.py"), "--compile", "--models", *map(str, folders), "--out", str(out))
    assert result.returncode == 0, result.stderr[-4000:]
    runs = {}
    for i, (name, folder) in enumerate(zip(MODELS, folders, strict=True)):
        model = IdeficsForVisionText2Text.from_pretrained(folder)
        alone = run(model, json.loads((folder / "config.json").read_text()), compile=i == 0)
        ranks = [load_file(out / f"{folder.name}-rank{r}.safetensors") for r in range(2)]
        runs[name] = (model, alone, ranks)
    return runs


@pytest.mark.parametrize("name", MODELS)
def test_two_ranks_give_the_one_process_numbers(name, sharded_runs):
    _, alone, ranks = sharded_runs[name]
    for r, got in enumerate(ranks):
        torch.testing.assert_close(got["logits"], alone["logits"], rtol=0, atol=1e-5, msg=f"rank {r} logits")
        for kind in ("greedy", "beam", "sampled"):
            assert torch.equal(got[kind], alone[kind]), f"rank {r} {kind} tokens differ from one process"
        assert bool(got["unseeded_agree"]), "without a seed the ranks sampled different tokens"
    if "compiled" in alone:
        assert torch.equal(ranks[0]["compiled"], alone["greedy"]) and torch.equal(ranks[1]["compiled"], alone["greedy"])


@pytest.mark.parametrize("name", MODELS)
def test_each_rank_holds_half_of_the_sharded_weights(name, sharded_runs):
    """Sharded: every decoder / gated Linear and the LM head's regular rows; replicated: all the rest (stated in
    idefics.parallel.plan). Each rank's bytes = replicated + its shards', to the byte."""
    model, _, ranks = sharded_runs[name]
    sharded = 0
    for module_name, module in model.named_modules():
        in_stack = module_name.startswith(("model.layers.", "model.gated_cross_attn_layers."))
        if (in_stack and isinstance(module, torch.nn.Linear)) or module_name == "lm_head":
            sharded += module.weight.numel() * module.weight.element_size()
    total = weight_bytes(model)
    replicated = total - sharded
    vocab, d = model.lm_head.weight.shape
    rows = vocab_shards(vocab, 2)
    itemsize = model.lm_head.weight.element_size()
    for r, got in enumerate(ranks):
        head_share = rows[r] * d * itemsize
        expected = replicated + (sharded - vocab * d * itemsize) // 2 + head_share
        assert int(got["weight_bytes"]) == expected, f"rank {r}"
    assert sharded > replicated  # the test would prove little on a model that is mostly replicated


def test_torchrun_cli_generate_prints_the_one_process_answer_once(tmp_path):
    question = ["generate", "--image", str(RED), "What color is the shape?"]
    alone = subprocess.run([sys.executable, "-m", "idefics", *question], capture_output=True, text=True, timeout=120)
    assert alone.returncode == 0, alone.stderr
    sharded = torchrun("-m", "idefics", *question)
    assert sharded.returncode == 0, sharded.stderr[-4000:]
    assert sharded.stdout == alone.stdout and alone.stdout.strip()  # one answer: rank 1 prints nothing


def test_refusals_are_one_line_errors_not_hangs(tmp_path, reference_checkpoints):
    folder = reference_checkpoints(MODELS[0])[1]
    script = tmp_path / "load.py"
    script.write_text(
        "import os, sys, torch\n"
        "from idefics import IdeficsForVisionText2Text\n"
        "from idefics.parallel import TensorParallelError\n"
        "dtype = sys.argv[2].split(',')[int(os.environ['RANK'])]\n"
        "try:\n"
        "    IdeficsForVisionText2Text.from_pretrained(sys.argv[1], dtype=dtype, tp_plan='auto')\n"
        "except TensorParallelError as err:\n"
        "    print('error:', err)\n"
        "    sys.exit(3)\n"
    )
    mismatched = torchrun(str(script), str(folder), "float32,bfloat16")  # the ranks disagree on the dtype
    assert mismatched.returncode != 0
    assert "rank(s) 1 of 2 have different model settings" in mismatched.stdout
    three = torchrun(str(script), str(folder), "float32,float32,float32", nproc=3)  # 4 heads over 3 ranks
    assert three.returncode != 0
    assert "num_attention_heads (4) is not divisible by 3" in three.stdout


def test_adapters_are_refused_on_a_sharded_model():
    from idefics.adapters import LoraConfig

    model = IdeficsForVisionText2Text.from_pretrained(DEMO_MODEL)
    model.tensor_parallel = TensorParallel(group=None, rank=0, size=2, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="not supported on a model sharded over 2 processes"):
        model.add_adapter(LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="not supported on a model sharded over 2 processes"):
        model.load_adapter("/nonexistent")


def test_tp_plan_without_a_process_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(TensorParallelError, match="needs a process group: start the program with torchrun"):
        IdeficsForVisionText2Text.from_pretrained(DEMO_MODEL, tp_plan="auto")
    with pytest.raises(TensorParallelError, match="tp_plan must be 'auto' or None"):
        IdeficsForVisionText2Text.from_pretrained(DEMO_MODEL, tp_plan="colwise")


def _meta_model(**changes):
    from idefics import IdeficsConfig

    config = IdeficsConfig.from_pretrained(DEMO_MODEL)
    for key, value in changes.items():
        setattr(config, key, value)
    with torch.device("meta"):
        return IdeficsForVisionText2Text(config)


@pytest.mark.parametrize(
    ("changes", "size", "field"),
    [({}, 3, "num_attention_heads (4)"), ({"intermediate_size": 338}, 4, "intermediate_size (338)")],
)
def test_plan_names_the_field_the_world_size_does_not_divide(changes, size, field):
    tp = TensorParallel(group=None, rank=0, size=size, device=torch.device("cpu"))
    with pytest.raises(TensorParallelError, match=rf"{field.replace('(', '[(]').replace(')', '[)]')} is not divisible"):
        apply_plan(_meta_model(**changes), tp)


def test_plan_shards_for_each_rank():
    """The demo model's 401-row vocabulary over 4 ranks: 101 + 100 + 100 + 100 rows; heads and MLP width split."""
    for rank in range(4):
        model = _meta_model()
        slices = apply_plan(model, TensorParallel(group=None, rank=rank, size=4, device=torch.device("cpu")))
        attention = model.model.layers[0].self_attn
        assert attention.num_heads == 1 and attention.q_proj.weight.shape == (32, 128)
        assert slices[attention.o_proj] == (1, 32 * rank, 32 * (rank + 1))
        assert slices[model.model.layers[0].mlp.gate_proj] == (0, 84 * rank, 84 * (rank + 1))
        start = [0, 101, 201, 301][rank]
        assert slices[model.lm_head] == (0, start, start + (101 if rank == 0 else 100))
        assert model.lm_head.additional_fc.weight.shape == (3, 128)  # the additional rows stay whole
        assert model.model.vision_model not in slices and model.model.embed_tokens not in slices
    backbone = _meta_model().model  # IdeficsModel alone: no LM head to split
    assert isinstance(backbone, IdeficsModel)
    apply_plan(backbone, TensorParallel(group=None, rank=1, size=2, device=torch.device("cpu")))


@pytest.mark.parametrize("bf16", [False, True])
def test_loader_reads_row_and_column_slices(tmp_path, bf16):
    """`load_checkpoint(slices=)`: the rank's slice of each tensor, cast on the way, from safetensors and .bin."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    a, b = torch.randn(6, 10), torch.randn(8, 4)
    for kind in ("safetensors", "bin"):
        folder = tmp_path / kind
        folder.mkdir()
        if kind == "safetensors":
            save_file({"a.weight": a, "b.weight": b}, folder / "model.safetensors")
        else:
            torch.save({"a.weight": a, "b.weight": b}, folder / "pytorch_model.bin")
        model = torch.nn.Module()
        with torch.device("meta"):
            model.a, model.b = torch.nn.Linear(5, 6, bias=False), torch.nn.Linear(4, 3, bias=False)
        dtype = torch.bfloat16 if bf16 else None
        load_checkpoint(model, folder, dtype=dtype, slices={"a.weight": (1, 5, 10), "b.weight": (0, 3, 6)})
        assert torch.equal(model.a.weight, a[:, 5:].to(dtype or torch.float32))
        assert torch.equal(model.b.weight, b[3:6].to(dtype or torch.float32))


def test_engine_under_load_gives_each_request_its_one_process_tokens(tmp_path, reference_checkpoints):
    """8 requests over 4 slots, then their second turns (prefix and image cache hits), after 4 requests prefilled
    in two batches whose first rows finish inside the prefill: each gets the tokens generate() gives it in one
    process, and both ranks' caches made the same decisions."""
    from tp_engine_worker import REQUESTS, TOGETHER, encoded, second_turn

    folder = reference_checkpoints(MODELS[0])[1]
    result = torchrun(str(HERE / "tp_engine_worker.py"), str(folder), str(tmp_path / "tokens.json"))
    assert result.returncode == 0, result.stderr[-4000:]
    got = json.loads((tmp_path / "tokens.json").read_text())
    model = IdeficsForVisionText2Text.from_pretrained(folder)

    def alone(prompt: dict, max_tokens: int) -> list[int]:
        extra = {k: v for k, v in prompt.items() if k != "input_ids"}
        out = model.generate(prompt["input_ids"], max_new_tokens=max_tokens, **extra)[0, prompt["input_ids"].shape[1] :]
        out = out.tolist()
        return out[: out.index(2) + 1] if 2 in out else out

    for i, (seed, length, images, max_tokens) in enumerate(REQUESTS):
        prompt = encoded(seed, length, images)
        assert got["first"][i] == alone(prompt, max_tokens), f"request {i}"
        assert got["second"][i] == alone(second_turn(prompt, got["first"][i], 4), max_tokens), f"request {i}, turn 2"
    for i, (seed, length, images, max_tokens) in enumerate(TOGETHER):
        assert got["together"][i] == alone(encoded(seed, length, images), max_tokens), f"request {i} of 4 together"
    ranks = [json.loads((tmp_path / f"tokens.json.rank{r}").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    assert ranks[0]["image_cache"]["hits"] > 0 and ranks[0]["prefix_hits"] > 0


def test_eval_with_two_ranks_predicts_what_one_process_does(tmp_path):
    from idefics.cli import main
    from idefics.demo.eval_sets import write_eval_sets

    root = write_eval_sets(tmp_path / "sets", val=6, train=12, seed=0)
    args = ["eval", "--task", "vqa", "--questions", str(root / "vqa/val_questions.json"),
            "--annotations", str(root / "vqa/val_annotations.json"), "--images", str(root / "vqa/val"),
            "--shots", "0,2", "--trials", "1", "--no-progress", "--batch-size", "4"]  # fmt: skip
    assert main([*args, "--output", str(tmp_path / "one"), "--engine"]) == 0
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    command = [sys.executable, "-m", "idefics", *args, "--output", str(tmp_path / "two"), "--tensor-parallel-size", "2"]
    two = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-4000:]

    def predictions(folder):
        rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
        return sorted(json.dumps(row, sort_keys=True) for row in rows)

    assert predictions(tmp_path / "two") == predictions(tmp_path / "one") and len(predictions(tmp_path / "one")) == 12


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantised_loading_composes_with_the_split(scheme, reference_checkpoints, tmp_path):
    """Each rank quantises its own slices while loading (int4's group sizes chosen for the rank's widths): the logits
    stay as close to full precision as one process's quantised model, int8's greedy tokens are one process's (its
    per-channel scales do not depend on the split), and each rank holds fewer bytes than the quantised whole."""
    folder = reference_checkpoints(MODELS[0])[1]
    result = torchrun(str(HERE / "tp_worker.py"), "--quantize", scheme, "--models", str(folder), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-4000:]
    config = json.loads((folder / "config.json").read_text())
    full = run(IdeficsForVisionText2Text.from_pretrained(folder), config)["logits"].flatten()
    quantised = IdeficsForVisionText2Text.from_pretrained(folder, quantize=scheme)
    alone = run(quantised, config)
    cosine = torch.nn.functional.cosine_similarity
    floor = min(0.999, float(cosine(alone["logits"].flatten(), full, dim=0))) - 0.01
    for r in range(2):
        got = load_file(tmp_path / f"{folder.name}-{scheme}-rank{r}.safetensors")
        similarity = float(cosine(got["logits"].flatten(), full, dim=0))
        assert similarity > floor, (
            f"rank {r}: cosine {similarity:.5f} to full precision, one process {floor + 0.01:.5f}"
        )
        if scheme == "int8":
            assert torch.equal(got["greedy"], alone["greedy"])
        # int4: the tiny model's 24-wide down_proj shards take no group size and stay in full precision
        assert int(got["weight_bytes"]) < (0.85 if scheme == "int8" else 1.0) * weight_bytes(quantised)
