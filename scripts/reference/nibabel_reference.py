#!/usr/bin/env python3
"""Reference values for every NIfTI file under datasets/cache/, computed with nibabel.

Writes tests/data/nifti_reference.json (keyed by path relative to datasets/cache/).
It only reads the scan files; run scripts/fetch-data.sh first. Needs numpy and
nibabel==5.4.2, e.g. in a throwaway venv:

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install numpy nibabel==5.4.2
    /tmp/refvenv/bin/python scripts/reference/nibabel_reference.py

Per file:
  sha256        of the file as stored (ties the values to the exact bytes)
  image_class   "Nifti1Image" / "Nifti2Image"
  shape         full header shape (dim[1..dim[0]])
  datatype      on-disk dtype, byte order removed (e.g. "int16"); endian: byte order of
                the header/file, "little" or "big"
  zooms         header pixdim for each dimension
  affine        img.affine (the one nibabel picks: sform if sform_code > 0, else qform
                if qform_code > 0, else the fallback), 4x4, full float precision
  sform, qform  header.get_sform() / get_qform(), 4x4
  sform_code, qform_code, xyzt_units, vox_offset (as stored)
  extensions    header extensions: [{"code", "size" (bytes on disk incl. 8-byte head)}]
  slope, inter  header scl_slope / scl_inter as stored in the file (NaN -> null; note
                that nibabel's img.header shows NaN there once loaded)
  applied_slope, applied_inter  what nibabel actually applies (1, 0 when unused)
  min, max, sum of img.get_fdata() (float64, scaling applied); nan_count
  voxel_sample  5 voxels: {"index": [i, j, k, (t, ...)], "value": float}; centre first,
                then (1/4,1/4,1/4), (3/4,3/4,3/4), (1/4,3/4,1/2), (3/4,1/4,1/4) of each
                spatial dim (integer division), extra dims at 0
"""
import hashlib
import json
import math
import os
import sys

import nibabel as nib
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = os.path.join(ROOT, "datasets", "cache")
OUT = os.path.join(ROOT, "tests", "data", "nifti_reference.json")


def fnum(x):
    x = float(x)
    return None if math.isnan(x) else x


def mat(m):
    return None if m is None else [[float(v) for v in row] for row in np.asarray(m)]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sample_indices(shape):
    sp = list(shape[:3]) + [1] * (3 - len(shape[:3]))
    fr = [(1, 2, 1, 2, 1, 2), (1, 4, 1, 4, 1, 4), (3, 4, 3, 4, 3, 4), (1, 4, 3, 4, 1, 2), (3, 4, 1, 4, 1, 4)]
    out = []
    for a, b, c, d, e, f in fr:
        idx = [sp[0] * a // b, sp[1] * c // d, sp[2] * e // f][: len(shape[:3])]
        idx += [0] * (len(shape) - len(idx))
        out.append(idx)
    return out


def raw_header(img, path):
    # img.header is a copy on which nibabel resets scl_slope/scl_inter to NaN and
    # vox_offset to 0 (the proxy carries the scaling): read the header as stored.
    with nib.openers.ImageOpener(path) as f:
        return img.header_class.from_fileobj(f)


def describe(path):
    img = nib.load(path)
    hdr = img.header
    raw = raw_header(img, path)
    dt = img.get_data_dtype()
    shape = [int(s) for s in hdr.get_data_shape()]
    data = img.get_fdata(dtype=np.float64)
    finite = data[~np.isnan(data)]
    return {
        "sha256": sha256(path),
        "image_class": type(img).__name__,
        "shape": shape,
        "datatype": dt.newbyteorder("=").name,
        "endian": "big" if hdr.endianness == ">" else "little",
        "zooms": [float(z) for z in hdr.get_zooms()],
        "affine": mat(img.affine),
        "sform": mat(hdr.get_sform()),
        "qform": mat(hdr.get_qform()),
        "sform_code": int(hdr["sform_code"]),
        "qform_code": int(hdr["qform_code"]),
        "xyzt_units": int(hdr["xyzt_units"]),
        "vox_offset": float(raw["vox_offset"]),
        "extensions": [
            {"code": int(e.get_code()), "size": int(e.get_sizeondisk())} for e in raw.extensions
        ],
        "slope": fnum(raw["scl_slope"]),
        "inter": fnum(raw["scl_inter"]),
        "applied_slope": float(img.dataobj.slope),
        "applied_inter": float(img.dataobj.inter),
        "min": float(finite.min()) if finite.size else None,
        "max": float(finite.max()) if finite.size else None,
        "sum": float(finite.sum(dtype=np.float64)),
        "nan_count": int(data.size - finite.size),
        "voxel_sample": [
            {"index": idx, "value": fnum(data[tuple(idx)])} for idx in sample_indices(shape)
        ],
    }


def main():
    if not os.path.isdir(CACHE):
        sys.exit(f"{CACHE} missing: run scripts/fetch-data.sh first")
    paths = []
    for d, dirs, files in os.walk(CACHE):
        dirs[:] = sorted(x for x in dirs if x != "downloads" and not x.startswith("."))
        for f in files:
            if f.endswith((".nii", ".nii.gz")):
                paths.append(os.path.join(d, f))
    rel = sorted(os.path.relpath(p, CACHE) for p in paths)
    out = {
        "_produced_by": "python3 scripts/reference/nibabel_reference.py "
        f"(nibabel {nib.__version__}, numpy {np.__version__}; values from img.get_fdata())",
    }
    for r in rel:
        print(r, file=sys.stderr)
        out[r] = describe(os.path.join(CACHE, r))
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(out, f, indent=1, allow_nan=False)
        f.write("\n")
    print(f"wrote {os.path.relpath(OUT, ROOT)} ({len(rel)} files)", file=sys.stderr)


if __name__ == "__main__":
    main()
