"""Times MONAI's HD95, ASSD and NSD on the mask pair of benches/eval.rs (512 x 512 x 300, two
ellipsoids, spacing 1 x 0.8 x 0.8 mm), on CPU.

    /tmp/torchvenv/bin/python scripts/reference/monai_eval_bench.py
"""
import time

import numpy as np
import torch
from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance, compute_surface_dice

torch.set_num_threads(2)
k, j, i = np.ogrid[:300, :512, :512]


def ellipsoid(c, r):
    return ((k - c[0]) / r[0]) ** 2 + ((j - c[1]) / r[1]) ** 2 + ((i - c[2]) / r[2]) ** 2 <= 1.0


truth = torch.from_numpy(ellipsoid([150, 256, 256], [100, 180, 160]))[None, None].float()
pred = torch.from_numpy(ellipsoid([153, 261, 252], [97, 184, 158]))[None, None].float()
spacing = [1.0, 0.8, 0.8]
for name, fn in [
    ("hd95", lambda: compute_hausdorff_distance(pred, truth, percentile=95, spacing=spacing)),
    ("assd", lambda: compute_average_surface_distance(pred, truth, symmetric=True, spacing=spacing)),
    ("nsd", lambda: compute_surface_dice(pred, truth, class_thresholds=[2.0], spacing=spacing)),
]:
    t = time.perf_counter()
    value = float(fn()[0, 0])
    print(f"MONAI {name} = {value:.4f} in {time.perf_counter() - t:.2f} s")
