"""Image preprocessing throughput: ours vs transformers' IdeficsImageProcessorPil, in the same process.

32 JPEGs of 640x480 are resized to 224x224, decoding included: every round opens the JPEG bytes afresh (PIL opens
lazily, so the processors decode). Rounds alternate between the two, and the median round is reported.

    python benchmarks/image_processing.py [--rounds 15] [--threads N]
"""

import argparse
import io
import os
import statistics
import time

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from idefics.processing import IdeficsImageProcessor


def make_jpegs(count: int, *, width: int = 640, height: int = 480) -> list[bytes]:
    """Photo-like JPEGs: smooth colour fields with detail and noise (quality 90)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    jpegs = []
    for _ in range(count):
        fx, fy, phase = rng.uniform(2, 12, size=3)
        channels = [np.sin(fx * x + c * phase) * np.cos(fy * y - c) for c in range(3)]
        image = 127 + 100 * np.stack(channels, axis=-1) + rng.normal(0, 12, (height, width, 3))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    return jpegs


def timed(run, jpegs: list[bytes]) -> tuple[float, torch.Tensor]:
    images = [Image.open(io.BytesIO(data)) for data in jpegs]  # lazy: decoding happens inside `run`
    start = time.perf_counter()
    out = run(images)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads and our decode workers")
    args = parser.parse_args()

    import transformers
    from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil

    torch.set_num_threads(args.threads)
    jpegs = make_jpegs(args.images)
    ours = IdeficsImageProcessor(num_workers=args.threads)
    reference = IdeficsImageProcessorPil()
    runs = {
        "reference": lambda images: reference(images, return_tensors="pt"),
        "ours": ours.preprocess,
    }
    for run in runs.values():  # warm-up
        timed(run, jpegs)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    outputs = {}
    for _ in tqdm(range(args.rounds), desc="rounds", leave=False):
        for name, run in runs.items():
            elapsed, outputs[name] = timed(run, jpegs)
            seconds[name].append(elapsed)

    rate = {name: args.images / statistics.median(times) for name, times in seconds.items()}
    difference = (outputs["ours"] - outputs["reference"]).abs().max().item()
    print(
        f"{args.images} JPEGs 640x480 -> 224x224, decode included; torch threads {args.threads}, "
        f"our workers {args.threads}; median of {args.rounds} rounds"
    )
    reference_name = f"reference (transformers {transformers.__version__}, IdeficsImageProcessorPil)"
    print(f"{reference_name:<56} {rate['reference']:7.1f} images/s")
    print(f"{'ours (idefics.processing.IdeficsImageProcessor)':<56} {rate['ours']:7.1f} images/s")
    print(f"speed-up {rate['ours'] / rate['reference']:.2f}x, max abs difference {difference:.2e}")


if __name__ == "__main__":
    main()
