#!/usr/bin/env bash
# Fetch real scan files that ship inside registry packages into datasets/cache/.
#
# Every archive is pinned (name, version, file name) and checked against a hard-coded
# SHA-256 before anything is unpacked. Only the listed files are unpacked; each package's
# licence text is copied beside them. Nothing from these packages is installed or run
# (except that `pip download` of the TotalSegmentator *source* archive runs its setup.py
# egg_info in pip's isolated build environment to read its metadata).
#
# Usage: scripts/fetch-data.sh [--only pkg1,pkg2,...]
#   packages: pydicom totalsegmentator heudiconv nibabel dipy nilearn mricron itk
#
# Idempotent: a package whose stamp file datasets/cache/<pkg>/.done exists is skipped
# entirely (no network). Archives are kept in datasets/cache/downloads/ and reused.
# To refetch a package: rm -rf datasets/cache/<pkg>. See /work/shared/DATA.md for why
# each file is there.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

CACHE="datasets/cache"
DL="$CACHE/downloads"
ALL_PKGS=(pydicom totalsegmentator heudiconv nibabel dipy nilearn mricron itk)

# ---------------------------------------------------------------- pinned archives
PYDICOM_VER=3.0.2
PYDICOM_FILE=pydicom-3.0.2-py3-none-any.whl
PYDICOM_SHA=abf971a5440f84dbaf42c4b6758e30e62480902584f8b270b9a5d146e278a07b

TOTSEG_VER=2.18.0
TOTSEG_FILE=totalsegmentator-2.18.0.tar.gz
TOTSEG_SHA=5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03

HEUDICONV_VER=1.5.1
HEUDICONV_FILE=heudiconv-1.5.1-py3-none-any.whl
HEUDICONV_SHA=a8926a8b10afa9cf04c4aaddf9e3c1b846536483f9fd138ac34abb9080ec89d7

NIBABEL_VER=5.4.2
NIBABEL_FILE=nibabel-5.4.2-py3-none-any.whl
NIBABEL_SHA=553482c5f1e1034fc312edf6fb7f32236c0056439845d1c29293b7e8c98d4854

# dipy has no pure wheel: the CPython 3.11 manylinux x86_64 wheel is pinned whatever
# the host's Python (the data files are identical in every wheel).
DIPY_VER=1.12.1
DIPY_FILE=dipy-1.12.1-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl
DIPY_SHA=65013b80f6e61c4c52de7b61da6e36afa76b09ccfe8c456414519b36609d7bb6

NILEARN_VER=0.14.1
NILEARN_FILE=nilearn-0.14.1-py3-none-any.whl
NILEARN_SHA=725206484e9fb3f6691f9c2d20204a068759d5072f12055324702ee0cb2bbe8a

# Debian bookworm
MRICRON_VER=1.2.20211006+dfsg-4
MRICRON_FILE=mricron-data_1.2.20211006+dfsg-4_all.deb
MRICRON_SHA=d40aa0ed66cf89bf6cafa049ad3884703c9d975c2ee2737525b7196528df9d6f

ITK_VER=5.2.1-5+deb12u1
ITK_FILE=insighttoolkit5-examples_5.2.1-5+deb12u1_all.deb
ITK_SHA=6ca1f323eac0b3cba50e786bbf0f2c76ed44b52ecb9e7aeea808ccc42bf09f69

# ---------------------------------------------------------------- helpers
die() { echo "fetch-data: ERROR: $*" >&2; exit 1; }

usage() {
    echo "usage: $0 [--only pkg1,pkg2,...]"
    echo "packages: ${ALL_PKGS[*]}"
}

SELECTED=("${ALL_PKGS[@]}")
while [ $# -gt 0 ]; do
    case "$1" in
        --only)
            [ $# -ge 2 ] || die "--only needs a comma-separated list"
            IFS=',' read -r -a SELECTED <<<"$2"; shift 2 ;;
        --only=*)
            IFS=',' read -r -a SELECTED <<<"${1#--only=}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done
for p in "${SELECTED[@]}"; do
    case " ${ALL_PKGS[*]} " in
        *" $p "*) ;;
        *) die "unknown package '$p' (known: ${ALL_PKGS[*]})" ;;
    esac
done

if command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1; then
    PIP=(python3 -m pip)
else
    PIP=(pip)
fi

# verify FILE SHA: fail loudly unless FILE has exactly this SHA-256.
verify() {
    local file="$1" want="$2" got
    got="$(sha256sum "$file" | cut -d' ' -f1)"
    if [ "$got" != "$want" ]; then
        echo "fetch-data: SHA-256 MISMATCH for $file" >&2
        echo "  expected $want" >&2
        echo "  got      $got" >&2
        die "refusing to unpack $file (delete it to download again, or fix the pinned sum)"
    fi
}

# fetch_pip FILE SHA NAME==VER [extra pip args...]: make sure $DL/FILE exists and checks.
fetch_pip() {
    local file="$1" sha="$2" spec="$3"; shift 3
    if [ ! -f "$DL/$file" ]; then
        local tmp="$DL/.tmp-pip-$$"
        rm -rf "$tmp"; mkdir -p "$tmp"
        if ! "${PIP[@]}" download --quiet --no-deps -d "$tmp" "$@" "$spec" >"$tmp.log" 2>&1; then
            cat "$tmp.log" >&2; rm -rf "$tmp" "$tmp.log"
            die "pip download $spec failed"
        fi
        if [ ! -f "$tmp/$file" ]; then
            echo "pip produced: $(ls "$tmp")" >&2; rm -rf "$tmp" "$tmp.log"
            die "pip download $spec did not produce $file"
        fi
        verify "$tmp/$file" "$sha"   # a bad download never lands in $DL
        mv "$tmp/$file" "$DL/$file"
        rm -rf "$tmp" "$tmp.log"
    fi
    verify "$DL/$file" "$sha"
}

# fetch_deb FILE SHA NAME VERSION: make sure $DL/FILE exists and checks.
fetch_deb() {
    local file="$1" sha="$2" name="$3" ver="$4"
    if [ ! -f "$DL/$file" ]; then
        local tmp="$DL/.tmp-deb-$$"
        rm -rf "$tmp"; mkdir -p "$tmp"
        if ! (cd "$tmp" && apt-get download "$name=$ver") >"$tmp.log" 2>&1; then
            # Package lists may be missing or stale: update once and retry.
            apt-get update -qq >>"$tmp.log" 2>&1 || true
            if ! (cd "$tmp" && apt-get download "$name=$ver") >>"$tmp.log" 2>&1; then
                cat "$tmp.log" >&2; rm -rf "$tmp" "$tmp.log"
                die "apt-get download $name=$ver failed (if Debian dropped this version, place $file in $DL/ by hand)"
            fi
        fi
        [ -f "$tmp/$file" ] || { echo "apt produced: $(ls "$tmp")" >&2; die "apt-get download did not produce $file"; }
        verify "$tmp/$file" "$sha"   # a bad download never lands in $DL
        mv "$tmp/$file" "$DL/$file"
        rm -rf "$tmp" "$tmp.log"
    fi
    verify "$DL/$file" "$sha"
}

need_unzip() {
    command -v unzip >/dev/null 2>&1 && return 0
    echo "fetch-data: unzip missing, installing it with apt-get" >&2
    { apt-get install -y -qq unzip || { apt-get update -qq && apt-get install -y -qq unzip; }; } >/dev/null \
        || die "could not install unzip"
}

# unzip_to ARCHIVE DEST PREFIX NAME...: extract PREFIX/NAME flat into DEST (fails if any is absent).
unzip_to() {
    local archive="$1" dest="$2" prefix="$3"; shift 3
    local members=() n
    for n in "$@"; do members+=("$prefix/$n"); done
    mkdir -p "$dest"
    unzip -q -o -j "$archive" "${members[@]}" -d "$dest" || die "unzip of ${members[*]} from $archive failed"
}

# deb_to ARCHIVE DEST PATH...: extract ./PATH from the .deb data tarball flat into DEST.
deb_to() {
    local archive="$1" dest="$2"; shift 2
    local tmp="$dest/.deb-tree" members=() p
    for p in "$@"; do members+=("./$p"); done
    mkdir -p "$tmp"
    dpkg-deb --fsys-tarfile "$archive" | tar x -C "$tmp" "${members[@]}" \
        || die "extracting ${members[*]} from $archive failed"
    for p in "$@"; do cp "$tmp/$p" "$dest/"; done
    rm -rf "$tmp"
}

# ---------------------------------------------------------------- packages
# Each do_<pkg> fills "$1" (a staging directory) and sets SRC to the archive used.

do_pydicom() {
    local st="$1"
    need_unzip
    fetch_pip "$PYDICOM_FILE" "$PYDICOM_SHA" "pydicom==$PYDICOM_VER"
    unzip_to "$DL/$PYDICOM_FILE" "$st" pydicom/data/test_files \
        CT_small.dcm MR_small.dcm MR_small_implicit.dcm MR_small_bigendian.dcm \
        MR_small_expb.dcm MR_small_RLE.dcm MR_small_jp2klossless.dcm \
        MR_small_jpeg_ls_lossless.dcm MR_small_padded.dcm JPGExtended.dcm JPEG2000.dcm \
        693_J2KI.dcm J2K_pixelrep_mismatch.dcm image_dfl.dcm SC_rgb_rle_2frame.dcm \
        rtstruct.dcm liver_1frame.dcm liver_expb_1frame.dcm \
        MR_truncated.dcm no_meta.dcm JPEG-lossy.dcm JPEG2000-embedded-sequence-delimiter.dcm
    # README.txt documents the origin and licences of the test files.
    unzip -q -p "$DL/$PYDICOM_FILE" pydicom/data/test_files/README.txt >"$st/TEST_FILES_README.txt"
    unzip -q -p "$DL/$PYDICOM_FILE" pydicom-3.0.2.dist-info/licenses/LICENSE >"$st/LICENSE"
    SRC="$PYDICOM_FILE"
}

do_totalsegmentator() {
    local st="$1" top="totalsegmentator-$TOTSEG_VER"
    local ref="$top/tests/reference_files"
    fetch_pip "$TOTSEG_FILE" "$TOTSEG_SHA" "totalsegmentator==$TOTSEG_VER" --no-binary totalsegmentator
    tar xzf "$DL/$TOTSEG_FILE" -C "$st" --strip-components=3 \
        "$ref/example_ct_dicom" \
        "$ref/example_seg_dicom.nii.gz" "$ref/example_ct.nii.gz" \
        "$ref/example_seg_fast_force_split.nii.gz" "$ref/example_ct_sm.nii.gz" \
        "$ref/example_seg.nii.gz" "$ref/example_mr_sm.nii.gz" "$ref/example_seg_mr.nii.gz" \
        "$ref/aorta_report/example_ct.nii.gz" \
        || die "extracting reference files from $TOTSEG_FILE failed"
    mv "$st/aorta_report/example_ct.nii.gz" "$st/aorta_example_ct.nii.gz"
    rmdir "$st/aorta_report"
    tar xzf "$DL/$TOTSEG_FILE" -O "$top/LICENSE" >"$st/LICENSE"
    SRC="$TOTSEG_FILE"
}

do_heudiconv() {
    local st="$1"
    need_unzip
    fetch_pip "$HEUDICONV_FILE" "$HEUDICONV_SHA" "heudiconv==$HEUDICONV_VER"
    unzip_to "$DL/$HEUDICONV_FILE" "$st" heudiconv/tests/data \
        MRI_102TD_PHA_S.MR.Chen_Matthews_1.3.1.2022.11.16.15.50.20.357.31204541.dcm
    unzip -q -p "$DL/$HEUDICONV_FILE" heudiconv-1.5.1.dist-info/licenses/LICENSE >"$st/LICENSE"
    SRC="$HEUDICONV_FILE"
}

do_nibabel() {
    local st="$1"
    need_unzip
    fetch_pip "$NIBABEL_FILE" "$NIBABEL_SHA" "nibabel==$NIBABEL_VER"
    unzip_to "$DL/$NIBABEL_FILE" "$st" nibabel/tests/data \
        anatomical.nii example4d.nii.gz example_nifti2.nii.gz functional.nii \
        reoriented_anat_moved.nii standard.nii.gz
    unzip_to "$DL/$NIBABEL_FILE" "$st/nicom" nibabel/nicom/tests/data \
        0.dcm siemens_dwi_1000.dcm.gz
    unzip -q -p "$DL/$NIBABEL_FILE" nibabel-5.4.2.dist-info/licenses/COPYING >"$st/LICENSE"
    SRC="$NIBABEL_FILE"
}

do_dipy() {
    local st="$1"
    need_unzip
    fetch_pip "$DIPY_FILE" "$DIPY_SHA" "dipy==$DIPY_VER" \
        --only-binary=:all: --platform manylinux2014_x86_64 --python-version 3.11 \
        --implementation cp --abi cp311
    unzip_to "$DL/$DIPY_FILE" "$st" dipy/data/files \
        S0_10slices.nii.gz aniso_vox.nii.gz ascm_out_test.nii.gz small_64D.nii
    unzip -q -p "$DL/$DIPY_FILE" dipy-1.12.1.dist-info/LICENSE >"$st/LICENSE"
    SRC="$DIPY_FILE"
}

do_nilearn() {
    local st="$1"
    need_unzip
    fetch_pip "$NILEARN_FILE" "$NILEARN_SHA" "nilearn==$NILEARN_VER"
    unzip_to "$DL/$NILEARN_FILE" "$st" nilearn/datasets/data \
        mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz \
        mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz \
        mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz
    unzip -q -p "$DL/$NILEARN_FILE" nilearn-0.14.1.dist-info/licenses/LICENSE >"$st/LICENSE"
    SRC="$NILEARN_FILE"
}

do_mricron() {
    local st="$1" t=usr/share/mricron/templates
    fetch_deb "$MRICRON_FILE" "$MRICRON_SHA" mricron-data "$MRICRON_VER"
    # aal.nii.txt: the AAL region names (index -> label).
    deb_to "$DL/$MRICRON_FILE" "$st" \
        "$t/ch2.nii.gz" "$t/ch2bet.nii.gz" "$t/aal.nii.gz" "$t/aal.nii.txt" "$t/ch2better.nii.gz" \
        usr/share/doc/mricron-data/copyright
    SRC="$MRICRON_FILE"
}

do_itk() {
    local st="$1" d=usr/share/doc/insighttoolkit5-examples
    fetch_deb "$ITK_FILE" "$ITK_SHA" insighttoolkit5-examples "$ITK_VER"
    deb_to "$DL/$ITK_FILE" "$st" \
        "$d/examples/Data/KmeansTest_T1UCharRaw.nii.gz" \
        "$d/examples/Data/KmeansTest_T1RawSkullStrip.nii.gz" \
        "$d/examples/Data/KmeansTest_T1KmeansPrelimSegmentation.nii.gz" \
        "$d/copyright"
    SRC="$ITK_FILE"
}

# ---------------------------------------------------------------- main
mkdir -p "$DL"
stage=""
cleanup() { if [ -n "$stage" ]; then rm -rf "$stage"; fi; rm -rf "$DL"/.tmp-*-$$ "$DL"/.tmp-*-$$.log; }
trap cleanup EXIT
for pkg in "${SELECTED[@]}"; do
    out="$CACHE/$pkg"
    if [ -f "$out/.done" ]; then
        echo "$pkg: up to date ($(find "$out" -type f ! -name .done | wc -l) files in $out, skipped)"
        continue
    fi
    stage="$CACHE/.stage-$pkg"
    rm -rf "$stage"; mkdir -p "$stage"
    SRC=""
    "do_$pkg" "$stage"
    rm -rf "$out"
    mv "$stage" "$out"
    stage=""
    echo "$SRC" >"$out/.done"
    echo "$pkg: fetched $(find "$out" -type f ! -name .done | wc -l) files from $SRC (sha256 ok) into $out"
done
