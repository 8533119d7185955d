"""Official architectures at their published sizes: load, parity with spandrel, CPU speed, tiling.

For each registry entry the network is built with the official configuration
(random weights: the real checkpoints cannot be downloaded here), saved as
``{'params': state_dict}``, loaded through ``models.loading.load_model`` and
run on a crop of a real photograph. Printed per model: parameters, load time,
seconds per megapixel on one CPU thread, max |project - spandrel|, and the
mean/max difference between a tiled run and a whole-image run.

    python bench/bench_official.py [--size 256] [--only nafnet-gopro,fftformer-gopro]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import spandrel
import spandrel_extra_arches
import torch
from skimage import data
from spandrel.architectures.FFTformer import FFTformer
from spandrel.architectures.NAFNet import NAFNet
from spandrel.architectures.Uformer import Uformer
from spandrel_extra_arches.architectures.MPRNet import MPRNet
from spandrel_extra_arches.architectures.Restormer import Restormer

OFFICIAL: dict[str, Callable[[], torch.nn.Module]] = {
    # options/test/GoPro/NAFNet-width64.yml
    "nafnet-gopro": lambda: NAFNet(width=64, enc_blk_nums=[1, 1, 1, 28], middle_blk_num=1, dec_blk_nums=[1, 1, 1, 1]),
    # Motion_Deblurring/Options/Deblurring_Restormer.yml (the class defaults)
    "restormer-gopro": lambda: Restormer(),
    # MPRNet Deblurring/MPRNet.py defaults
    "mprnet-gopro": lambda: MPRNet(n_feat=96, scale_unetfeats=48, scale_orsnetfeats=32, num_cab=8),
    # FFTformer GoPro option file (the class defaults)
    "fftformer-gopro": lambda: FFTformer(),
    # Uformer_B
    "uformer-gopro": lambda: Uformer(
        embed_dim=32, depths=[1, 2, 8, 8, 2, 8, 8, 2, 1], win_size=8, modulator=True, token_mlp="leff"
    ),
}


def photo(size: int) -> torch.Tensor:
    image = np.asarray(data.astronaut(), dtype=np.float32)[:size, 100 : 100 + size] / 255.0
    return torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256,
                        help="side of the square test crop (at least 128: the tiled run overlaps tiles by 32 px)")
    parser.add_argument("--only", default="", help="comma-separated entry names")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ["DEBLUR_ALLOW_NONCOMMERCIAL"] = "1"
    spandrel_extra_arches.install(ignore_duplicates=True)
    from models.catalog import REGISTRY
    from models.loading import load_model

    names = [n for n in OFFICIAL if not args.only or n in args.only.split(",")]
    if args.size < 128:
        parser.error(f"--size {args.size}: use at least 128 (tiles of size/2 + 32 px must overlap by 32 px, "
                     "which needs tiles of more than 64 px)")
    x = photo(args.size)
    cpu = torch.device("cpu")
    print(f"crop {args.size}x{args.size}, 1 thread, random weights at the official sizes")
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            torch.manual_seed(0)
            net = OFFICIAL[name]().eval()
            sd = net.state_dict()
            path = Path(folder) / f"{name}.pth"
            torch.save({"params": sd}, path)
            params_m = sum(v.numel() for v in sd.values()) / 1e6
            started = time.perf_counter()
            model = load_model(REGISTRY.parse(f"{name}:path={path},tile=-1"), cpu)
            load_s = time.perf_counter() - started
            started = time.perf_counter()
            ours = model(x).image
            run_s = time.perf_counter() - started
            with torch.inference_mode():
                reference = spandrel.ModelLoader().load_from_state_dict(sd).eval()(x)
            parity = (ours - reference).abs().max().item()
            tile = args.size // 2 + 32
            tiled_model = load_model(REGISTRY.parse(f"{name}:path={path},tile={tile},tile_overlap=32"), cpu)
            tiled = tiled_model(x).image
            diff = (tiled - ours).abs()
            print(
                f"{name:16s} {params_m:6.2f} M params  load {load_s:5.2f} s  "
                f"{run_s / (args.size * args.size / 1e6):7.1f} s/MP  parity max|diff| {parity:.2e}  "
                f"tiled({tile},32) vs whole mean {diff.mean().item():.2e} max {diff.max().item():.2e}"
            )
            del net, model, tiled_model


if __name__ == "__main__":
    main()
