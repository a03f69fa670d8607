"""Reference values for medseg's evaluation metrics, computed with MONAI on real masks.

Pairs of real masks on one grid each:
- `itk_brain`, `itk_class6`: the ITK k-means example (Debian insighttoolkit5-examples), 128 x 128 x 62
  voxels at 2 x 2 x 3 mm (anisotropic on purpose): truth from KmeansTest_T1KmeansPrelimSegmentation
  (labels >= 5, resp. == 6), prediction from KmeansTest_T1RawSkullStrip (labels >= 5, resp. == 6).
- `ch2_brain`: Colin27 at 1 mm (Debian mricron-data): truth = ch2bet > 0 (brain extraction),
  prediction = aal > 0 (union of the AAL atlas regions).

    python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch monai nibabel scipy
    /tmp/torchvenv/bin/python scripts/reference/monai_eval_reference.py > tests/data/eval_reference.json
"""
import json
import sys

import monai
import nibabel as nib
import numpy as np
import torch
from monai.metrics import (
    compute_average_surface_distance,
    compute_dice,
    compute_hausdorff_distance,
    compute_surface_dice,
)

TAU = 2.0


def load(rel):
    img = nib.load("datasets/cache/" + rel)
    return np.asanyarray(img.dataobj), [float(z) for z in img.header.get_zooms()[:3]]


prelim, itk_spacing = load("itk/KmeansTest_T1KmeansPrelimSegmentation.nii.gz")
strip, _ = load("itk/KmeansTest_T1RawSkullStrip.nii.gz")
ch2bet, ch2_spacing = load("mricron/ch2bet.nii.gz")
aal, _ = load("mricron/aal.nii.gz")
PAIRS = {
    "itk_brain": (prelim >= 5, strip >= 5, itk_spacing),
    "itk_class6": (prelim == 6, strip == 6, itk_spacing),
    "ch2_brain": (ch2bet > 0, aal > 0, ch2_spacing),
}

out = {
    "_produced_by": "scripts/reference/monai_eval_reference.py (MONAI %s, torch %s)" % (monai.__version__, torch.__version__),
    "nsd_tolerance_mm": TAU,
    "pairs": {},
}
for name, (truth, pred, spacing) in PAIRS.items():
    t = torch.from_numpy(truth)[None, None].float()
    p = torch.from_numpy(pred)[None, None].float()
    out["pairs"][name] = {
        "spacing_xyz": spacing,
        "truth_voxels": int(t.sum()),
        "pred_voxels": int(p.sum()),
        "dice": float(compute_dice(p, t, include_background=True)[0, 0]),
        "hd95_mm": float(compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=spacing)[0, 0]),
        "assd_mm": float(compute_average_surface_distance(p, t, include_background=True, symmetric=True, spacing=spacing)[0, 0]),
        "nsd": float(compute_surface_dice(p, t, class_thresholds=[TAU], include_background=True, spacing=spacing)[0, 0]),
    }
json.dump(out, sys.stdout, indent=1)
print()
