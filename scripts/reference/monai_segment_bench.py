"""The `medseg segment` pipeline in PyTorch + MONAI, for timing against scripts/bench-segment.sh.

Same work per case as medseg: read the NIfTI scan, resample to 3 mm (trilinear), CT-normalise,
MONAI `sliding_window_inference` with the PyTorch twin of HybridSegNet (2D, 96x96 windows over every
axial slice, overlap 0.5, Gaussian weighting sigma 1/8, 4 windows per batch; optionally mirror TTA
over the two in-plane axes), threshold, nearest-neighbour back to the source grid, write the uint8
mask as .nii.gz. Weights are random (speed does not depend on them). Prints seconds and peak RSS.

    python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch monai nibabel
    /tmp/torchvenv/bin/python scripts/reference/monai_segment_bench.py datasets/cache/bench/ct_512x512x300.nii.gz tiny [--tta]
"""
import resource
import sys
import time

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from torch_model_bench import PRESETS, Net  # noqa: E402

torch.set_num_threads(2)


def main():
    path, preset = sys.argv[1], sys.argv[2]
    tta = "--tta" in sys.argv
    p = PRESETS[preset]
    net = Net(2, [96, 96], p["widths"], p["embed"], p["depth"], p["heads"], p["mlp"]).eval()

    start = time.perf_counter()
    img = nib.load(path)
    data = np.asanyarray(img.dataobj).astype(np.float32)  # [x, y, z]
    spacing = np.array(img.header.get_zooms()[:3], dtype=float)
    target = np.maximum(np.round(np.array(data.shape) * spacing / 3.0), 1).astype(int)
    with torch.no_grad():
        vol = torch.from_numpy(data)[None, None]
        small = F.interpolate(vol, size=tuple(target), mode="trilinear", align_corners=False)
        del vol
        small = (small.clamp(-100, 250) - 100.0) / 40.0
        # 2D windows over axial slices: [1, 1, x, y, z] -> [1, 1, z, y, x] so depth is the slice axis.
        small = small.permute(0, 1, 4, 3, 2).contiguous()

        def predictor(x):  # [B, 1, 1, 96, 96] -> [B, 2, 1, 96, 96]
            b = x.shape[0]
            y = net(x[:, :, 0])
            return y.softmax(1)[:, :, None]

        def infer(x):
            return sliding_window_inference(x, (1, 96, 96), 4, predictor, overlap=(0.0, 0.5, 0.5), mode="gaussian", sigma_scale=0.125)

        probs = infer(small)
        if tta:
            for dims in ([3], [4], [3, 4]):
                probs += infer(small.flip(dims)).flip(dims)
            probs /= 4
        labels = (probs[:, 1:2] >= 0.5).to(torch.uint8).permute(0, 1, 4, 3, 2)  # back to [x, y, z]
        full = F.interpolate(labels.float(), size=data.shape, mode="nearest").to(torch.uint8)[0, 0].numpy()
    out = nib.Nifti1Image(full, img.affine)
    nib.save(out, "/tmp/monai_bench_mask.nii.gz")
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"monai {preset} tta={tta} seconds={seconds:.1f} peak_rss_MiB={rss:.0f}")


if __name__ == "__main__":
    main()
