#!/usr/bin/env python3
"""Checks medseg's DICOM-SEG and RTSTRUCT outputs with readers medseg did not write.

For every case NAME in a `medseg segment --format nifti,dicom-seg,rtstruct` output directory:

  SEG       highdicom.seg.segread opens NAME_seg.dcm; its label volume, placed by highdicom's own
            geometry (Volume.affine, LPS), is mapped voxel by voxel onto NAME.nii.gz's grid (nibabel,
            RAS) and must equal that label map exactly (segment -> label value from the Segment
            Description medseg writes, `label value N`). Segment property types must match
            --expect NAME=SCHEME:VALUE when given.
  RTSTRUCT  pydicom reads NAME_rtstruct.dcm; each ROI's contours are rasterised onto the mask grid
            with matplotlib's point-in-polygon (even-odd over the contours of a plane) and must
            reach Dice >= 0.98 against the mask's class (or lesion). With --series, rt-utils also
            rasterises every ROI onto that series (cv2.fillPoly) for single-frame series.

Needs highdicom 0.28 (pydicom 3), nibabel, matplotlib, and rt-utils, e.g.:

    python3 -m venv /tmp/dcmvenv
    /tmp/dcmvenv/bin/pip install highdicom rt-utils dicompyler-core nibabel
    /tmp/dcmvenv/bin/python scripts/reference/dicom_export_check.py OUT_DIR [--series DIR]

Prints one JSON line per case and exits 1 when any check fails. dciodvfy (Debian dicom3tools) is
run separately: scripts/check-dicom-export.sh.
"""

import argparse
import json
import pathlib
import sys

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
from matplotlib.path import Path as PolyPath

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def label_values(case_dir, name):
    sidecar = json.loads((case_dir / f"{name}_labels.json").read_text())
    return {v: int(k) for k, v in sidecar["labels"].items()}


def check_seg(seg_path, mask, affine, expect):
    seg = hd.seg.segread(str(seg_path))
    values, types = {}, {}
    for n in seg.segment_numbers:
        d = seg.get_segment_description(n)
        text = str(getattr(d, "SegmentDescription", ""))
        values[n] = int(text.split()[-1]) if text.startswith("label value") else n
        t = d.segmented_property_type
        types[str(d.segment_label)] = f"{t.scheme_designator}:{t.value}"
    vol = seg.get_volume(combine_segments=True, relabel=False)
    arr = np.asarray(vol.array)
    idx = np.indices(arr.shape).reshape(3, -1)
    world = vol.affine @ np.vstack([idx, np.ones(idx.shape[1])])
    ijk = np.linalg.inv(affine) @ (LPS_TO_RAS @ world)
    rounded = np.rint(ijk[:3]).astype(int)
    off = float(np.abs(ijk[:3] - rounded).max())
    inside = np.all((rounded >= 0) & (rounded < np.array(mask.shape)[:, None]), axis=0)
    flat = arr.reshape(-1)
    rebuilt = np.zeros_like(mask)
    lut = np.zeros(max(values) + 1, dtype=mask.dtype)
    for n, v in values.items():
        lut[n] = v
    keep = inside & (flat > 0)
    rebuilt[tuple(rounded[:, keep])] = lut[flat[keep]]
    result = {
        "seg_segments": len(values),
        "seg_frames": int(seg.NumberOfFrames),
        "seg_grid_offset_voxels": off,
        "seg_voxels_outside_mask_grid": int((~inside & (flat > 0)).sum()),
        "seg_equal": bool(np.array_equal(rebuilt, mask)) and off < 1e-3,
        "seg_types": types,
    }
    for want in expect:
        label, code = want.split("=", 1)
        if label in types and types[label] != code:
            result["seg_equal"] = False
            result.setdefault("seg_code_mismatch", []).append(f"{label}: {types[label]} != {code}")
    return result


def rasterise_rtstruct(rt_path, shape, affine):
    """ROI name -> boolean mask on the NIfTI grid, by even-odd filling of each plane's contours."""
    ds = pydicom.dcmread(str(rt_path))
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    inv = np.linalg.inv(affine)
    ni, nj = shape[0], shape[1]
    centres = np.stack(np.meshgrid(np.arange(ni), np.arange(nj), indexing="ij"), -1).reshape(-1, 2)
    out, worst_k = {}, 0.0
    for roi in ds.ROIContourSequence:
        name = names[int(roi.ReferencedROINumber)]
        m = np.zeros(shape, dtype=bool)
        for c in getattr(roi, "ContourSequence", []):
            pts = np.asarray(c.ContourData, dtype=float).reshape(-1, 3)
            ras = LPS_TO_RAS @ np.vstack([pts.T, np.ones(len(pts))])
            ijk = (inv @ ras)[:3]
            k = float(np.median(ijk[2]))
            worst_k = max(worst_k, float(np.abs(ijk[2] - round(k)).max()))
            inside = PolyPath(ijk[:2].T).contains_points(centres).reshape(ni, nj)
            m[:, :, int(round(k))] ^= inside
        out[name] = m
    return out, worst_k


def dice(a, b):
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2.0 * np.logical_and(a, b).sum() / s


def roi_truth(name, mask, values):
    """The mask voxels an ROI stands for: its class, or (per-lesion ROIs `CLASS ID`) the class."""
    if name in values:
        return mask == values[name]
    base = name.rsplit(" ", 1)[0]
    return mask == values.get(base, -1)


def check_rtstruct(rt_path, mask, affine, values):
    rois, off = rasterise_rtstruct(rt_path, mask.shape, affine)
    per_class = {}
    for name, m in rois.items():
        base = name if name in values else name.rsplit(" ", 1)[0]
        per_class[base] = per_class.get(base, np.zeros_like(m)) | m
    scores = {n: round(dice(m, roi_truth(n, mask, values)), 4) for n, m in per_class.items()}
    return {
        "rtstruct_rois": len(rois),
        "rtstruct_plane_offset_voxels": off,
        "rtstruct_dice": scores,
        "rtstruct_ok": off < 1e-3 and all(d >= 0.98 for d in scores.values()),
    }


def check_rt_utils(series, rt_path, mask, affine, values):
    """rt-utils' own rasterisation (single-frame series only). The TotalSegmentator sample's data
    sets have empty SOP Instance UIDs; they are taken from the file meta as medseg does."""
    from rt_utils import RTStructBuilder, image_helper

    plain = image_helper.load_dcm_images_from_path

    def with_meta_uids(path):
        images = plain(path)
        for ds in images:
            if not str(getattr(ds, "SOPInstanceUID", "")):
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        return images

    image_helper.load_dcm_images_from_path = with_meta_uids
    rt = RTStructBuilder.create_from(str(series), str(rt_path))
    images = image_helper.load_sorted_image_series(str(series))
    inv = np.linalg.inv(affine)
    planes = []
    for ds in images:
        p = LPS_TO_RAS @ np.array([*map(float, ds.ImagePositionPatient), 1.0])
        planes.append(int(round((inv @ p)[2])))
    scores = {}
    for name in rt.get_roi_names():
        got = rt.get_roi_mask_by_name(name)
        rebuilt = np.zeros(mask.shape, dtype=bool)
        for i, k in enumerate(planes):
            rebuilt[:, :, k] = got[:, :, i].T
        base = name if name in values else name.rsplit(" ", 1)[0]
        prev = scores.get(base)
        scores[base] = rebuilt if prev is None else prev | rebuilt
    dices = {n: round(dice(m, roi_truth(n, mask, values)), 4) for n, m in scores.items()}
    return {"rt_utils_dice": dices, "rt_utils_ok": all(d >= 0.98 for d in dices.values())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir", type=pathlib.Path)
    ap.add_argument("--series", type=pathlib.Path, help="single-frame source series for rt-utils")
    ap.add_argument("--expect", action="append", default=[], help="LABEL=SCHEME:VALUE")
    args = ap.parse_args()
    failed = False
    for seg_path in sorted(args.out_dir.glob("*_seg.dcm")):
        name = seg_path.name[: -len("_seg.dcm")]
        img = nib.load(str(args.out_dir / f"{name}.nii.gz"))
        mask = np.asarray(img.dataobj).astype(np.int64)
        values = label_values(args.out_dir, name)
        result = {"case": name, **check_seg(seg_path, mask, img.affine, args.expect)}
        rt_path = args.out_dir / f"{name}_rtstruct.dcm"
        if rt_path.exists():
            result.update(check_rtstruct(rt_path, mask, img.affine, values))
            if args.series:
                result.update(check_rt_utils(args.series, rt_path, mask, img.affine, values))
        ok = result["seg_equal"] and result.get("rtstruct_ok", True) and result.get("rt_utils_ok", True)
        result["ok"] = ok
        failed |= not ok
        print(json.dumps(result))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
