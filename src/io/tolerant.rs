//! A second reading of DICOM files that the strict parser refuses, for deviations real archives
//! hold and pydicom 3 reads: bytes after the last data element (zero padding or garbage), and a
//! data set encoded in the other little-endian VR encoding than its file meta declares (pydicom
//! checks the first element's VR the same way). What was done is returned as a note for the
//! volume's warnings. Geometry is never guessed here: the recovered object goes through the same
//! checks as any other.

use std::cell::Cell;
use std::io::Read;
use std::rc::Rc;

use dicom_core::VR;
use dicom_dictionary_std::uids;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::{DefaultDicomObject, FileMetaTable, InMemDicomObject};
use dicom_parser::dataset::DataToken;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use crate::io::dicom;

/// VRs whose explicit-VR header has a 4-byte length after 2 reserved bytes (PS3.5 Table 7.1-1).
fn long_header(vr: VR) -> bool {
    use VR::*;
    matches!(
        vr,
        OB | OD | OF | OL | OV | OW | SQ | SV | UC | UN | UR | UT | UV
    )
}

/// Where the data set starts: the end of the file meta group (group 0002, always explicit VR
/// little endian), walked element by element so a wrong group length does not matter. `body`
/// starts at "DICM".
fn data_set_start(body: &[u8]) -> Option<usize> {
    let mut at = 4;
    loop {
        let head = body.get(at..at + 8)?;
        if u16::from_le_bytes([head[0], head[1]]) != 0x0002 {
            return Some(at);
        }
        let (header, len) = if VR::from_binary([head[4], head[5]]).is_some_and(long_header) {
            let l = body.get(at + 8..at + 12)?;
            (12, u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize)
        } else {
            (8, u16::from_le_bytes([head[6], head[7]]) as usize)
        };
        at = at.checked_add(header + len)?;
    }
}

/// Whether the first data element carries an explicit VR (two letters of a known VR after its tag).
fn looks_explicit(data: &[u8]) -> bool {
    data.get(4..6)
        .is_some_and(|vr| VR::from_binary([vr[0], vr[1]]).is_some())
}

/// A reader over `inner` that shares how many bytes it has handed out.
struct Counting<'a> {
    inner: &'a [u8],
    taken: Rc<Cell<usize>>,
}

impl Read for Counting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let at = self.taken.get();
        let n = (self.inner.len() - at).min(buf.len());
        buf[..n].copy_from_slice(&self.inner[at..at + n]);
        self.taken.set(at + n);
        Ok(n)
    }
}

/// The length of the prefix of `data` made of complete top-level elements, when the parser stops
/// before the end; `None` when the whole of `data` parses. The token reader pulls exactly the bytes
/// each token needs (no read-ahead), so the count after a token is its end.
fn complete_prefix(data: &[u8], ts: &dicom_encoding::TransferSyntax) -> Option<usize> {
    let taken = Rc::new(Cell::new(0));
    let source = Counting {
        inner: data,
        taken: taken.clone(),
    };
    let tokens = dicom_parser::DataSetReader::new_with_ts(source, ts).ok()?;
    let mut last_good = 0usize;
    let mut depth = 0usize;
    for token in tokens {
        let Ok(token) = token else {
            return Some(last_good);
        };
        match &token {
            DataToken::SequenceStart { .. } | DataToken::PixelSequenceStart => depth += 1,
            DataToken::SequenceEnd => depth = depth.saturating_sub(1),
            // Items (and pixel fragments) are bounded like elements.
            DataToken::ItemStart { len }
                if len
                    .get()
                    .is_some_and(|l| l as usize > data.len() - taken.get()) =>
            {
                return Some(last_good);
            }
            DataToken::ElementHeader(h) => {
                // Zero padding reads as elements of group 0000, which no data set holds.
                if depth == 0 && h.tag.group() < 0x0008 {
                    return Some(last_good);
                }
                // A declared length beyond the data is where the parser would stop (and it would
                // first allocate that much).
                if h.len
                    .get()
                    .is_some_and(|l| l as usize > data.len() - taken.get())
                {
                    return Some(last_good);
                }
                if h.len.get() != Some(0) {
                    continue;
                }
            }
            _ => {}
        }
        if depth == 0 {
            last_good = taken.get();
        }
    }
    (taken.get() < data.len()).then_some(last_good)
}

/// Reads `bytes` (a whole file, with or without its preamble) when the strict parser could not:
/// the data set in the VR encoding its first element shows, and up to its last complete element.
/// Returns the object and what was done; `None` when neither deviation explains the failure.
pub fn reread(bytes: &[u8]) -> Option<(DefaultDicomObject, Vec<String>)> {
    let body = match (bytes.get(128..132), bytes.get(..4)) {
        (Some(b"DICM"), _) => &bytes[128..],
        (_, Some(b"DICM")) => bytes,
        _ => return None,
    };
    // The meta reader zero-fills declared lengths: one corrupt length must not cost gigabytes.
    if dicom::oversized_meta_element(&body[4..], bytes.len() as u64).is_some() {
        return None;
    }
    let mut meta = FileMetaTable::from_reader(body).ok()?;
    let start = data_set_start(body)?;
    let data = &body[start..];
    let declared = meta.transfer_syntax().trim_end_matches('\0').to_string();
    let mut notes = Vec::new();
    let uid = match (declared.as_str(), looks_explicit(data)) {
        (uids::IMPLICIT_VR_LITTLE_ENDIAN, true) => {
            notes.push("the data set is explicit VR but the file meta says implicit: read as explicit (as pydicom does)".to_string());
            uids::EXPLICIT_VR_LITTLE_ENDIAN
        }
        (uids::EXPLICIT_VR_LITTLE_ENDIAN, false) => {
            notes.push("the data set is implicit VR but the file meta says explicit: read as implicit (as pydicom does)".to_string());
            uids::IMPLICIT_VR_LITTLE_ENDIAN
        }
        (uid, _) => uid,
    }
    .to_string();
    // Deflated data sets cannot be walked byte by byte.
    if dicom::is_deflated(&uid) {
        return None;
    }
    let ts = TransferSyntaxRegistry.get(&uid)?;
    let end = match complete_prefix(data, ts) {
        Some(0) => return None,
        // A file that ends inside its pixel data is truncated, not padded: the strict error stands.
        Some(end) if data[end..].starts_with(&[0xE0, 0x7F, 0x10, 0x00]) => return None,
        Some(end) => {
            notes.push(format!(
                "{} bytes after the last complete data element were ignored",
                data.len() - end
            ));
            end
        }
        None => data.len(),
    };
    if notes.is_empty() {
        return None;
    }
    let obj = InMemDicomObject::read_dataset_with_ts(&data[..end], ts).ok()?;
    meta.set_transfer_syntax(ts);
    Some((obj.with_exact_meta(meta), notes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_walk_and_vr_sniffing() {
        // "DICM", one explicit UL meta element (group length 4 bytes), then an implicit element.
        let mut body = b"DICM".to_vec();
        body.extend([0x02, 0, 0, 0, b'U', b'L', 4, 0, 0, 0, 0, 0]);
        let start = body.len();
        body.extend([0x08, 0, 0x05, 0, 10, 0, 0, 0]);
        assert_eq!(data_set_start(&body), Some(start));
        assert!(!looks_explicit(&body[start..]));
        assert!(looks_explicit(&[0x08, 0, 0x05, 0, b'C', b'S', 2, 0]));
    }
}
