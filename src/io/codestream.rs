//! The image size a compressed frame declares in its own header: JPEG and JPEG-LS (the SOF
//! segment, ITU T.81 B.2.2 and T.87 C.2.2) and JPEG 2000 (the SIZ segment, T.800 A.5.1, bare or in
//! a JP2 `jp2c` box). Decoders allocate by that size, not by the DICOM header's Rows and Columns,
//! so a frame claiming 30 000 × 30 000 pixels inside a 3 KB file costs gigabytes unless it is
//! refused first (found by fuzzing).

/// What a compressed frame declares of itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Declared {
    /// Columns.
    pub columns: u32,
    /// Rows.
    pub rows: u32,
    /// Components (samples per pixel).
    pub components: u32,
}

/// The size a compressed frame declares; `None` when its header is not recognised (the
/// decoder then reports what it finds).
pub fn declared_size(frame: &[u8]) -> Option<Declared> {
    match frame {
        [0xFF, 0xD8, ..] => jpeg_size(frame),
        [0xFF, 0x4F, 0xFF, 0x51, ..] => j2k_size(&frame[2..]),
        _ => j2k_size(jp2_codestream(frame)?.get(2..)?),
    }
}

fn be16(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from(u16::from_be_bytes(
        b.get(at..at + 2)?.try_into().ok()?,
    )))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Walks the marker segments after SOI to the first frame header (SOF0–15 but DHT, JPG, DAC;
/// SOF55 for JPEG-LS): `Lf P Y X Nf`.
fn jpeg_size(frame: &[u8]) -> Option<Declared> {
    let mut at = 2;
    loop {
        // Fill bytes (0xFF) may precede a marker.
        while frame.get(at) == Some(&0xFF) && frame.get(at + 1) == Some(&0xFF) {
            at += 1;
        }
        if *frame.get(at)? != 0xFF {
            return None;
        }
        let marker = *frame.get(at + 1)?;
        let is_frame_header = matches!(marker, 0xC0..=0xCF if !matches!(marker, 0xC4 | 0xC8 | 0xCC))
            || marker == 0xF7;
        if is_frame_header {
            return Some(Declared {
                columns: be16(frame, at + 7)?,
                rows: be16(frame, at + 5)?,
                components: u32::from(*frame.get(at + 9)?),
            });
        }
        // Segments without a length: RSTn, SOI, EOI, TEM.
        if matches!(marker, 0xD0..=0xD9 | 0x01) {
            at += 2;
            continue;
        }
        at += 2 + be16(frame, at + 2)? as usize;
    }
}

/// `SIZ`: `Lsiz Rsiz Xsiz Ysiz XOsiz YOsiz XTsiz YTsiz XTOsiz YTOsiz Csiz`, with `siz`
/// starting at the SIZ marker.
fn j2k_size(siz: &[u8]) -> Option<Declared> {
    if siz.get(..2)? != [0xFF, 0x51] {
        return None;
    }
    let (x, y) = (be32(siz, 6)?, be32(siz, 10)?);
    let (x0, y0) = (be32(siz, 14)?, be32(siz, 18)?);
    Some(Declared {
        columns: x.checked_sub(x0)?,
        rows: y.checked_sub(y0)?,
        components: be16(siz, 38)?,
    })
}

/// The codestream of a JP2 file (T.800 Annex I): the payload of its `jp2c` box, found by
/// walking the boxes from the signature box (`LBox TBox [XLBox]`; `LBox` 0: to the end).
fn jp2_codestream(file: &[u8]) -> Option<&[u8]> {
    if file.get(..12)? != b"\0\0\0\x0cjP  \r\n\x87\n" {
        return None;
    }
    let mut at = 0usize;
    while at < file.len() {
        let (length, header) = match be32(file, at)? {
            0 => (file.len() - at, 8),
            1 => {
                let long = u64::from(be32(file, at + 8)?) << 32 | u64::from(be32(file, at + 12)?);
                (usize::try_from(long).ok()?, 16)
            }
            n => (n as usize, 8),
        };
        if length < header {
            return None;
        }
        if file.get(at + 4..at + 8)? == b"jp2c" {
            return file.get(at + header..);
        }
        at = at.checked_add(length)?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_read_from_jpeg_jpeg_ls_and_jpeg_2000_headers() {
        let size = |columns, rows, components| {
            Some(Declared {
                columns,
                rows,
                components,
            })
        };
        // SOI, an APP0 segment, then SOF0 of 8 bits, 3 rows by 5 columns, one component.
        let jpeg = [
            0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x04, 0x00, 0x00, 0xFF, 0xC0, 0x00, 0x0B, 0x08, 0x00,
            0x03, 0x00, 0x05, 0x01, 0x01, 0x11, 0x00,
        ];
        assert_eq!(declared_size(&jpeg), size(5, 3, 1));
        // JPEG-LS: SOF55 right after SOI, three components.
        let ls = [
            0xFF, 0xD8, 0xFF, 0xF7, 0x00, 0x0B, 0x10, 0x02, 0x00, 0x01, 0x00, 0x03, 0x01, 0x11,
            0x00,
        ];
        assert_eq!(declared_size(&ls), size(256, 512, 3));
        // J2K: SOC, SIZ with Xsiz 300, Ysiz 200, an image offset of (100, 50), tiles, Csiz 1.
        let mut j2k = vec![0xFF, 0x4F, 0xFF, 0x51, 0x00, 0x29, 0x00, 0x00];
        for v in [300u32, 200, 100, 50, 300, 200, 0, 0] {
            j2k.extend(v.to_be_bytes());
        }
        j2k.extend([0x00, 0x01]);
        assert_eq!(declared_size(&j2k), size(200, 150, 1));
        // JP2: the signature box, a 16-byte box whose payload says "jp2c", then the codestream
        // box with a 64-bit length.
        let mut jp2 = b"\0\0\0\x0cjP  \r\n\x87\n".to_vec();
        jp2.extend(b"\0\0\0\x10xml jp2c....");
        jp2.extend(b"\0\0\0\x01jp2c");
        jp2.extend((16 + j2k.len() as u64).to_be_bytes());
        jp2.extend(&j2k);
        assert_eq!(declared_size(&jp2), size(200, 150, 1));
        assert_eq!(declared_size(&[0xFF, 0xD8, 0xFF]), None);
        assert_eq!(declared_size(b"raw bytes"), None);
        assert_eq!(declared_size(&jp2[..30]), None);
    }
}
