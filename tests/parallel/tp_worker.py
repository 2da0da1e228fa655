"""Run under torchrun by the tensor-parallel tests: load each checkpoint with tp_plan="auto", run the fixed batch
through forward, greedy, beam and seeded sampling, and (rank 0) save the results for the test to compare."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/reference.py

from reference import make_batch  # noqa: E402

from idefics import IdeficsForVisionText2Text  # noqa: E402
from idefics.quantization import weight_bytes  # noqa: E402


def run(model, config: dict, *, compile: bool = False) -> dict[str, torch.Tensor]:
    """Every output the tests compare, from one model (sharded or not); with `compile`, greedy compiled too."""
    input_ids, attention_mask, pixel_values, image_attention_mask = make_batch(config)
    inputs = dict(attention_mask=attention_mask, pixel_values=pixel_values, image_attention_mask=image_attention_mask)
    with torch.inference_mode():
        logits = model(input_ids, **inputs).logits
    common = dict(max_new_tokens=6, eos_token_id=[1], pad_token_id=0)
    compiled = {"compiled": model.generate(input_ids, **inputs, **common, compile=True)} if compile else {}
    return {
        **compiled,
        "logits": logits,
        "greedy": model.generate(input_ids, **inputs, **common),
        "beam": model.generate(input_ids, **inputs, **common, num_beams=3),
        "sampled": model.generate(input_ids, **inputs, **common, do_sample=True, top_k=8, seed=7),
        "sampled_unseeded": model.generate(input_ids, **inputs, **common, do_sample=True, top_k=8),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--compile", action="store_true", help="also greedy with compile=True (first model only)")
    parser.add_argument("--quantize", help="quantise while loading (int8, int4, nf4)")
    args = parser.parse_args()
    out = Path(args.out)
    for i, folder in enumerate(args.models):
        model = IdeficsForVisionText2Text.from_pretrained(folder, tp_plan="auto", quantize=args.quantize)
        config = json.loads((Path(folder) / "config.json").read_text())
        results = run(model, config, compile=args.compile and i == 0)
        rank = dist.get_rank()
        other = {k: v.clone() for k, v in results.items() if k == "sampled_unseeded"}
        gathered = [torch.empty_like(other["sampled_unseeded"]) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, other["sampled_unseeded"])  # every rank must have drawn the same tokens
        results["unseeded_agree"] = torch.tensor([all(torch.equal(g, gathered[0]) for g in gathered)])
        results["weight_bytes"] = torch.tensor([weight_bytes(model)])
        name = f"{Path(folder).name}{'-' + args.quantize if args.quantize else ''}-rank{rank}.safetensors"
        save_file({k: v.contiguous() for k, v in results.items()}, out / name)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
