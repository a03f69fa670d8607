//! medseg's integration tests: one binary, one module per area. Real scans come from
//! `scripts/fetch-data.sh` (into `datasets/cache/`); expected values computed once with nibabel and
//! pydicom live in `tests/data/*.json` with the command that produced them.

mod bad_input;
mod cli;
mod common;
mod cv;
mod dicom_conformance;
mod dicom_export;
mod evaluate;
mod geometry_oracle;
mod kernels;
mod model;
mod nifti_conformance;
mod review;
mod roundtrip;
mod segment;
mod synth;
mod train;
mod uncertainty;
