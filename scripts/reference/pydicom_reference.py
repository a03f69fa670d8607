#!/usr/bin/env python3
"""Reference values for the DICOM files under datasets/cache/, computed with pydicom.

Writes tests/data/dicom_reference.json. It only reads the scan files; run
scripts/fetch-data.sh first. Needs numpy, nibabel==5.4.2, pydicom==3.0.2 and the
pylibjpeg plugins (JPEG, JPEG-LS, JPEG 2000), e.g. in a throwaway venv:

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install numpy nibabel==5.4.2 pydicom==3.0.2 \
        pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg
    /tmp/refvenv/bin/python scripts/reference/pydicom_reference.py

Layout of the JSON:
  _produced_by, _versions, _decoders (pydicom plugins available per compressed syntax)
  files: {path relative to datasets/cache: entry}, for every file in pydicom/ (broken
      ones included, with the error), heudiconv/, nibabel/nicom/ (the .gz one is read
      through gzip). Entry fields:
        sha256, read ("ok" | "error"), read_error, read_with_force (only when a plain
        read failed: "ok" | "error"), has_file_meta, transfer_syntax (UID or null),
        transfer_syntax_name, n_elements (top-level elements parsed), sop_class_uid, modality, rows, cols, frames
        (NumberOfFrames, 1 if absent), samples_per_pixel, photometric, bits_allocated,
        bits_stored, high_bit, pixel_representation, rescale_slope, rescale_intercept
        (top level, null if absent), has_pixel_data,
        decode ("ok" | "error" | "no_pixel_data"), decode_error,
        pixel_shape, pixel_dtype (pydicom's array: name, byte order dropped),
        raw_min, raw_max, raw_sum (stored values), min, max, sum (float64 after
        RescaleSlope/Intercept when present; equal to raw_* otherwise)
      For files that only read with force=True the decode is attempted on that
      dataset, with the transfer syntax pydicom inferred, and marked "decode_note".
  mr_small_variants: every MR_small* codec variant compared to MR_small.dcm.
  totalsegmentator_series: example_ct_dicom/ slices sorted by position along the
      slice normal, the rescaled stack's stats, example_seg_dicom.nii.gz (nibabel
      affine/shape), and the RAS affine derived from the DICOM geometry with the axis
      flips that make it equal the NIfTI's.
  heudiconv_enhanced: per-frame functional-group geometry of the enhanced MR file.
"""
import gzip
import hashlib
import json
import os
import sys

import nibabel as nib
import numpy as np
import pydicom
from pydicom.pixels.decoders.base import get_decoder

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = os.path.join(ROOT, "datasets", "cache")
OUT = os.path.join(ROOT, "tests", "data", "dicom_reference.json")
TS_DIR = "totalsegmentator/example_ct_dicom"
TS_NIFTI = "totalsegmentator/example_seg_dicom.nii.gz"
HEUDICONV = "heudiconv/MRI_102TD_PHA_S.MR.Chen_Matthews_1.3.1.2022.11.16.15.50.20.357.31204541.dcm"


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def floats(v):
    return None if v is None else [float(x) for x in v]


def opt_float(ds, kw):
    v = ds.get(kw)
    return None if v is None or v == "" else float(v)


def opt_int(ds, kw):
    v = ds.get(kw)
    return None if v is None or v == "" else int(v)


def err(e):
    return f"{type(e).__name__}: {e}".splitlines()[0][:300]


def dcmread(rel, **kw):
    path = os.path.join(CACHE, rel)
    if rel.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            return pydicom.dcmread(f, **kw)
    return pydicom.dcmread(path, **kw)


def rescaled(ds, arr):
    slope, inter = opt_float(ds, "RescaleSlope"), opt_float(ds, "RescaleIntercept")
    out = arr.astype(np.float64)
    if slope is not None or inter is not None:
        out = out * (1.0 if slope is None else slope) + (0.0 if inter is None else inter)
    return out


def stats(prefix, a):
    return {f"{prefix}min": float(a.min()), f"{prefix}max": float(a.max()),
            f"{prefix}sum": float(a.sum(dtype=np.float64))}


def header_fields(ds):
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    has_px = any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
    return {
        "n_elements": len(ds),
        "has_file_meta": bool(meta is not None and len(meta) > 0),
        "transfer_syntax": str(ts) if ts else None,
        "transfer_syntax_name": ts.name if ts else None,
        "sop_class_uid": str(ds.get("SOPClassUID")) if "SOPClassUID" in ds else None,
        "modality": ds.get("Modality"),
        "rows": opt_int(ds, "Rows"),
        "cols": opt_int(ds, "Columns"),
        "frames": (opt_int(ds, "NumberOfFrames") or 1) if has_px else None,
        "samples_per_pixel": opt_int(ds, "SamplesPerPixel"),
        "photometric": ds.get("PhotometricInterpretation"),
        "bits_allocated": opt_int(ds, "BitsAllocated"),
        "bits_stored": opt_int(ds, "BitsStored"),
        "high_bit": opt_int(ds, "HighBit"),
        "pixel_representation": opt_int(ds, "PixelRepresentation"),
        "rescale_slope": opt_float(ds, "RescaleSlope"),
        "rescale_intercept": opt_float(ds, "RescaleIntercept"),
        "has_pixel_data": has_px,
    }


def decode_fields(ds):
    if not any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        return {"decode": "no_pixel_data"}, None
    try:
        arr = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - recorded as the reference outcome
        return {"decode": "error", "decode_error": err(e)}, None
    out = {"decode": "ok", "pixel_shape": list(arr.shape),
           "pixel_dtype": arr.dtype.newbyteorder("=").name}
    out.update(stats("raw_", arr.astype(np.float64)))
    out.update(stats("", rescaled(ds, arr)))
    return out, arr


def describe(rel):
    entry = {"sha256": sha256(os.path.join(CACHE, rel))}
    try:
        ds = dcmread(rel)
        entry["read"] = "ok"
    except Exception as e:  # noqa: BLE001
        entry["read"] = "error"
        entry["read_error"] = err(e)
        try:
            ds = dcmread(rel, force=True)
            entry["read_with_force"] = "ok"
        except Exception as e2:  # noqa: BLE001
            entry["read_with_force"] = "error"
            entry["read_with_force_error"] = err(e2)
            return entry, None
    entry.update(header_fields(ds))
    if entry["has_pixel_data"] and entry["transfer_syntax"] is None:
        # Only reachable for files read with force=True (no file meta): decode with
        # the encoding pydicom detected while reading.
        imp, little = ds.original_encoding
        tsuid = (pydicom.uid.ImplicitVRLittleEndian if imp else
                 pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian)
        if getattr(ds, "file_meta", None) is None:
            ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = tsuid
        entry["decode_note"] = f"read with force=True; decoded as {tsuid.name} (inferred by pydicom)"
    dec, arr = decode_fields(ds)
    entry.update(dec)
    return entry, arr


def slice_normal(iop):
    r, c = np.array(iop[:3], float), np.array(iop[3:], float)
    return np.cross(r, c)


def totalseg_series():
    d = os.path.join(CACHE, TS_DIR)
    slices = []
    for name in sorted(os.listdir(d)):
        rel = f"{TS_DIR}/{name}"
        ds = dcmread(rel)
        slices.append((rel, ds))
    n = slice_normal([float(x) for x in slices[0][1].ImageOrientationPatient])
    slices.sort(key=lambda t: float(np.dot(n, [float(x) for x in t[1].ImagePositionPatient])))
    rows = []
    arrays = []
    for rel, ds in slices:
        rows.append({
            "file": rel,
            "ImagePositionPatient": floats(ds.ImagePositionPatient),
            "ImageOrientationPatient": floats(ds.ImageOrientationPatient),
            "PixelSpacing": floats(ds.PixelSpacing),
            "InstanceNumber": opt_int(ds, "InstanceNumber"),
            "SliceThickness": opt_float(ds, "SliceThickness"),
            "SliceLocation": opt_float(ds, "SliceLocation"),
            "RescaleIntercept": opt_float(ds, "RescaleIntercept"),
            "RescaleSlope": opt_float(ds, "RescaleSlope"),
            "TransferSyntaxUID": str(ds.file_meta.TransferSyntaxUID),
            "Rows": int(ds.Rows), "Columns": int(ds.Columns),
            "position_along_normal": float(np.dot(n, floats(ds.ImagePositionPatient))),
        })
        try:
            arrays.append(rescaled(ds, ds.pixel_array))
        except Exception as e:  # noqa: BLE001
            arrays = None
            stack_err = err(e)
    out = {"directory": TS_DIR, "sorted_by": "ImagePositionPatient . (row_cos x col_cos)",
           "slice_normal": [float(x) for x in n], "slices": rows}
    pos = [r["position_along_normal"] for r in rows]
    out["slice_spacing_from_positions"] = sorted({round(b - a, 6) for a, b in zip(pos, pos[1:])})
    if arrays is None:
        out["stack"] = {"decode": "error", "decode_error": stack_err}
        return out
    vol = np.stack(arrays)  # (slice, row, col), float64 HU
    out["stack"] = {"decode": "ok", "shape_slice_row_col": list(vol.shape), **stats("", vol)}

    # DICOM geometry -> RAS affine for voxel index (i = column, j = row, k = sorted slice).
    iop = np.array(rows[0]["ImageOrientationPatient"])
    rc, cc = iop[:3], iop[3:]
    dr, dc = rows[0]["PixelSpacing"]  # row spacing (between rows), column spacing
    p0, pl = np.array(rows[0]["ImagePositionPatient"]), np.array(rows[-1]["ImagePositionPatient"])
    nk = len(rows)
    kstep = (pl - p0) / (nk - 1)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = rc * dc, cc * dr, kstep, p0
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    out["dicom_affine_ras_i_col_j_row_k_slice"] = ras.tolist()

    img = nib.load(os.path.join(CACHE, TS_NIFTI))
    aff = img.affine
    shape = [int(s) for s in img.shape]
    out["nifti"] = {"path": TS_NIFTI, "shape": shape, "affine": aff.tolist(),
                    "sform_code": int(img.header["sform_code"]),
                    "qform_code": int(img.header["qform_code"])}
    # Which flips of (i, j, k) of the DICOM-derived grid give the NIfTI affine?
    dims = [vol.shape[2], vol.shape[1], vol.shape[0]]
    matches = []
    for fi in (False, True):
        for fj in (False, True):
            for fk in (False, True):
                f = np.eye(4)
                for ax, flip in enumerate((fi, fj, fk)):
                    if flip:
                        f[ax, ax] = -1.0
                        f[ax, 3] = dims[ax] - 1
                cand = ras @ f
                diff = float(np.abs(cand - aff).max())
                if diff < 1e-3:
                    matches.append({"flip_i": fi, "flip_j": fj, "flip_k": fk, "max_abs_diff": diff})
    out["nifti_matches_dicom_with_flips"] = matches
    if matches and shape == dims:
        m = matches[0]
        v = np.transpose(vol, (2, 1, 0))  # (i=col, j=row, k=slice)
        if m["flip_i"]:
            v = v[::-1]
        if m["flip_j"]:
            v = v[:, ::-1]
        if m["flip_k"]:
            v = v[:, :, ::-1]
        lab = np.asanyarray(img.dataobj)
        labels, counts = np.unique(lab[lab > 0], return_counts=True)
        top = sorted(zip(counts.tolist(), labels.tolist()), reverse=True)[:8]
        out["overlay_check"] = {
            "note": "mean HU per label with the stack placed on the NIfTI grid by the flips above",
            "n_labels": int(labels.size),
            "largest_labels": [
                {"label": int(l), "voxels": int(c), "mean_hu": float(v[lab == l].mean())}
                for c, l in top],
            "mean_hu_background": float(v[lab == 0].mean()),
        }
    return out


def heudiconv_enhanced():
    ds = dcmread(HEUDICONV)
    frames = []
    for i, f in enumerate(ds.PerFrameFunctionalGroupsSequence):
        fr = {"frame": i}
        if "PlanePositionSequence" in f:
            fr["ImagePositionPatient"] = floats(f.PlanePositionSequence[0].ImagePositionPatient)
        if "PlaneOrientationSequence" in f:
            fr["ImageOrientationPatient"] = floats(f.PlaneOrientationSequence[0].ImageOrientationPatient)
        if "PixelMeasuresSequence" in f:
            pm = f.PixelMeasuresSequence[0]
            fr["PixelSpacing"] = floats(pm.get("PixelSpacing"))
            fr["SliceThickness"] = opt_float(pm, "SliceThickness")
        if "PixelValueTransformationSequence" in f:
            pv = f.PixelValueTransformationSequence[0]
            fr["RescaleSlope"] = opt_float(pv, "RescaleSlope")
            fr["RescaleIntercept"] = opt_float(pv, "RescaleIntercept")
        if "FrameContentSequence" in f:
            fc = f.FrameContentSequence[0]
            div = fc.get("DimensionIndexValues")
            fr["DimensionIndexValues"] = None if div is None else [int(x) for x in (div if isinstance(div, (list, pydicom.multival.MultiValue)) else [div])]
            fr["InStackPositionNumber"] = opt_int(fc, "InStackPositionNumber")
        frames.append(fr)
    shared = ds.SharedFunctionalGroupsSequence[0]
    arr = ds.pixel_array
    iops = [np.array(fr.get("ImageOrientationPatient")) for fr in frames]
    return {
        "file": HEUDICONV,
        "sop_class_uid": str(ds.SOPClassUID),
        "NumberOfFrames": int(ds.NumberOfFrames),
        "Rows": int(ds.Rows), "Columns": int(ds.Columns),
        "shared_groups_have": sorted(e.keyword for e in shared if e.keyword),
        "geometry_location": "per-frame (PlanePosition/PlaneOrientation/PixelMeasures not in shared groups)",
        "first3_ImagePositionPatient": [fr.get("ImagePositionPatient") for fr in frames[:3]],
        "last_ImagePositionPatient": frames[-1].get("ImagePositionPatient"),
        "orientations_identical": bool(all(np.allclose(iops[0], o, atol=1e-4) for o in iops)),
        "frames": frames,
        "pixel_shape": list(arr.shape),
        "per_frame_stats": [stats("", arr[i].astype(np.float64)) for i in range(arr.shape[0])],
    }


def main():
    if not os.path.isdir(CACHE):
        sys.exit(f"{CACHE} missing: run scripts/fetch-data.sh first")
    rels = sorted(f"pydicom/{f}" for f in os.listdir(os.path.join(CACHE, "pydicom")) if f.endswith(".dcm"))
    rels += sorted(f"heudiconv/{f}" for f in os.listdir(os.path.join(CACHE, "heudiconv")) if f.endswith(".dcm"))
    rels += ["nibabel/nicom/0.dcm", "nibabel/nicom/siemens_dwi_1000.dcm.gz"]
    files, arrays = {}, {}
    for rel in rels:
        print(rel, file=sys.stderr)
        files[rel], arrays[rel] = describe(rel)
        if rel.startswith("nibabel/nicom/") and files[rel].get("read") == "ok":
            ds = dcmread(rel)
            files[rel]["image_type"] = [str(x) for x in ds.get("ImageType", [])]
            nm = ds.get((0x0019, 0x100A))
            files[rel]["siemens_number_of_images_in_mosaic"] = None if nm is None else int(nm.value)
            files[rel]["manufacturer"] = ds.get("Manufacturer")

    ref = "pydicom/MR_small.dcm"
    variants = [r for r in rels if os.path.basename(r).startswith("MR_small")]
    same = {r: bool(arrays[r] is not None and np.array_equal(arrays[r].astype(np.int64), arrays[ref].astype(np.int64)))
            for r in variants}

    decoders = {}
    for rel in rels:
        ts = files[rel].get("transfer_syntax")
        if ts and pydicom.uid.UID(ts).is_compressed and ts not in decoders:
            try:
                decoders[ts] = list(get_decoder(ts).available_plugins)
            except Exception as e:  # noqa: BLE001
                decoders[ts] = [err(e)]

    versions = {"pydicom": pydicom.__version__, "numpy": np.__version__, "nibabel": nib.__version__}
    for mod in ("pylibjpeg", "openjpeg", "libjpeg"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            versions[mod] = None
    out = {
        "_produced_by": "python3 scripts/reference/pydicom_reference.py (versions in _versions; decoders in _decoders)",
        "_versions": versions,
        "_decoders": decoders,
        "files": files,
        "mr_small_variants": {"reference": ref, "identical_to_reference": same,
                              "all_identical": all(same.values())},
        "totalsegmentator_series": totalseg_series(),
        "heudiconv_enhanced": heudiconv_enhanced(),
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(out, f, indent=1, allow_nan=False)
        f.write("\n")
    print(f"wrote {os.path.relpath(OUT, ROOT)} ({len(files)} files)", file=sys.stderr)


if __name__ == "__main__":
    main()
