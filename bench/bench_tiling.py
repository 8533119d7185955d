"""Tiled restoration of a 24-megapixel image: peak memory, time, seams.

A convolutional network with 32 hidden channels would need ~3 GB of
activations per layer on a whole 6000x4000 image; tiled at 512 px it needs
~34 MB per layer. The script prints the process's peak RSS before and after
the tiled run (input and output alone are 288 MB each as float32), the
largest tensor the network ever saw, the time, and, on a crop small enough
to run whole, the difference between tiled and whole-image output (a seam
would show up there).

    python bench/bench_tiling.py [--width 6000 --height 4000 --tile 512 --overlap 32]
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch
from skimage import data

from models.base import Restored, RestorationModel
from models.registry import ModelInfo
from models.tiling import TiledModel


class SmallConvNet(RestorationModel):
    """3 -> 32 -> 32 -> 3 channels, 3x3 convolutions, residual output."""

    def __init__(self) -> None:
        info = ModelInfo(name="bench-conv", family="classic", license="MIT", summary="bench", factory="bench:none")
        super().__init__(info, {}, torch.device("cpu"))
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(32, 32, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(32, 3, 3, padding=1),
        ).eval()
        self.largest = 0

    def restore_batch(self, x: torch.Tensor) -> Restored:
        self.largest = max(self.largest, x.shape[-2] * x.shape[-1])
        return Restored(x + 0.1 * torch.tanh(self.net(x)))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=6000)
    parser.add_argument("--height", type=int, default=4000)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    photo = torch.from_numpy(np.asarray(data.astronaut(), dtype=np.float32) / 255.0).permute(2, 0, 1)
    reps = (-(-args.height // photo.shape[1]), -(-args.width // photo.shape[2]))
    x = photo.repeat(1, *reps)[None, :, : args.height, : args.width].contiguous()
    model = SmallConvNet()
    before = peak_rss_mb()
    started = time.perf_counter()
    out = TiledModel(model, tile=args.tile, overlap=args.overlap)(x).image
    seconds = time.perf_counter() - started
    after = peak_rss_mb()
    megapixels = args.width * args.height / 1e6
    print(f"image {args.width}x{args.height} ({megapixels:.1f} MP), tile {args.tile}, overlap {args.overlap}, 1 thread")
    print(f"input tensor {x.numel() * 4 / 2**20:.0f} MiB, output {out.numel() * 4 / 2**20:.0f} MiB")
    print(f"peak RSS before {before:.0f} MiB, after {after:.0f} MiB (+{after - before:.0f} MiB)")
    whole_layer = args.width * args.height * 32 * 4 / 2**20
    print(f"largest tile seen by the network: {model.largest} px; one 32-channel layer on the whole image would be {whole_layer:.0f} MiB")
    print(f"time {seconds:.1f} s ({seconds / megapixels:.2f} s/MP)")
    # Seams: on a crop small enough to run whole, compare tiled with untiled output.
    crop = x[..., :1536, :2048]
    whole = model(crop).image
    tiled = TiledModel(model, tile=args.tile, overlap=args.overlap)(crop).image
    diff = (tiled - whole).abs()
    print(
        f"tiled vs whole on a 2048x1536 crop: max |diff| {diff.max().item():.2e}, "
        f"mean {diff.mean().item():.2e} (the net's receptive field is 7 px, the overlap {args.overlap} px)"
    )


if __name__ == "__main__":
    main()
