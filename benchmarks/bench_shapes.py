"""Throughput of the built-in shapes data on one core: images/s of generated images and of training items.

    python benchmarks/bench_shapes.py [--resolution 64] [--num_images 4000]

"images" = scene sampling + rendering to a PIL image (`ShapesDataset[i]`); "training items" = the same plus the
conversion to a [-1, 1] tensor (`build_dataset(args)[i]`). Target: >= 2,000 images/s at 64 px.
"""

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from ldm_pipeline.config import DataConfig  # noqa: E402
from ldm_pipeline.data import ShapesDataset, build_dataset  # noqa: E402


def images_per_second(dataset, num_images: int) -> float:
    for i in range(min(100, num_images)):
        dataset[i]
    start = time.perf_counter()
    for i in range(num_images):
        dataset[i]
    return num_images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--num_images", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    images = images_per_second(ShapesDataset(args.num_images, args.resolution, args.seed), args.num_images)
    data = DataConfig(resolution=args.resolution, num_train_samples=args.num_images, data_seed=args.seed)
    items = images_per_second(build_dataset(data, "train"), args.num_images)
    print(f"shapes @ {args.resolution}px, 1 thread: {images:,.0f} images/s (PIL), {items:,.0f} training items/s (tensor)")


if __name__ == "__main__":
    main()
