//! Blocked gzip: parallel compression, and parallel decompression of blocked files.
//!
//! medseg writes `.gz` as a series of gzip members of at most 64 KiB each, every one carrying its
//! compressed size in a `BC` extra field — the BGZF layout of SAM/BAM (htslib, SAMv1 spec §4.1).
//! Any gzip reader (zlib, Python's gzip, nibabel, ITK) reads it as ordinary multi-member gzip, while
//! medseg can find every block without inflating and so inflate them on all cores. Other gzip files
//! are inflated as one stream.

use std::io::{Read, Write};

use flate2::read::{DeflateDecoder, MultiGzDecoder};
use flate2::write::DeflateEncoder;
use flate2::{Compression, Crc};
use rayon::prelude::*;

/// Uncompressed bytes per block: BGZF's limit, so a block stays under 64 KiB even when stored.
pub const BLOCK_INPUT: usize = 0xff00;
const HEADER_LEN: usize = 18;
const TRAILER_LEN: usize = 8;

/// Compresses `data` as blocked gzip, blocks in parallel, at zlib level 1 (nibabel's default).
pub fn compress(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let blocks: Vec<Vec<u8>> = data
        .par_chunks(BLOCK_INPUT)
        .map(block)
        .collect::<std::io::Result<_>>()?;
    let mut out = Vec::with_capacity(blocks.iter().map(Vec::len).sum());
    for b in blocks {
        out.extend_from_slice(&b);
    }
    Ok(out)
}

/// One block of blocked gzip holding `chunk` (at most [`BLOCK_INPUT`] bytes): a gzip member with
/// the `BC` extra field. Blocks written one after another make a blocked gzip file.
pub fn block(chunk: &[u8]) -> std::io::Result<Vec<u8>> {
    if chunk.len() > BLOCK_INPUT {
        return Err(std::io::Error::other(
            "gzip block input exceeds 65280 bytes",
        ));
    }
    let mut enc = DeflateEncoder::new(
        Vec::with_capacity(chunk.len() / 4 + 64),
        Compression::fast(),
    );
    enc.write_all(chunk)?;
    let mut cdata = enc.finish()?;
    if HEADER_LEN + cdata.len() + TRAILER_LEN > 1 << 16 {
        // Incompressible data (noise, float probabilities) can grow under level-1
        // Huffman coding; stored blocks cost only 5 bytes per 64 KiB and always fit.
        let mut stored =
            DeflateEncoder::new(Vec::with_capacity(chunk.len() + 64), Compression::none());
        stored.write_all(chunk)?;
        cdata = stored.finish()?;
    }
    let mut crc = Crc::new();
    crc.update(chunk);
    let bsize = HEADER_LEN + cdata.len() + TRAILER_LEN;
    let bsize_field =
        u16::try_from(bsize - 1).map_err(|_| std::io::Error::other("gzip block exceeds 64 KiB"))?;
    let mut block = Vec::with_capacity(bsize);
    // ID1 ID2 CM FLG(FEXTRA) MTIME(4) XFL OS(unknown) XLEN=6, then subfield "BC", SLEN=2, BSIZE-1.
    block.extend_from_slice(&[31, 139, 8, 4, 0, 0, 0, 0, 0, 255, 6, 0, b'B', b'C', 2, 0]);
    block.extend_from_slice(&bsize_field.to_le_bytes());
    block.extend_from_slice(&cdata);
    block.extend_from_slice(&crc.sum().to_le_bytes());
    block.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
    Ok(block)
}

/// Block layout of a blocked gzip file: `(offset, compressed size, uncompressed size)` per block,
/// or `None` when the file is not blocked throughout.
fn blocks(data: &[u8]) -> Option<Vec<(usize, usize, usize)>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let h = data.get(at..at + HEADER_LEN)?;
        if h[0..4] != [31, 139, 8, 4] || h[10..16] != [6, 0, b'B', b'C', 2, 0] {
            return None;
        }
        let bsize = u16::from_le_bytes([h[16], h[17]]) as usize + 1;
        if bsize < HEADER_LEN + TRAILER_LEN {
            return None;
        }
        let t = data.get(at + bsize - 4..at + bsize)?;
        let isize = u32::from_le_bytes([t[0], t[1], t[2], t[3]]) as usize;
        if isize > BLOCK_INPUT * 2 {
            return None;
        }
        out.push((at, bsize, isize));
        at += bsize;
    }
    Some(out)
}

/// Inflates a gzip file: blocked files block-parallel (CRC-checked), others as one stream.
pub fn decompress(data: &[u8]) -> std::io::Result<Vec<u8>> {
    if let Some(layout) = blocks(data) {
        let total: usize = layout.iter().map(|b| b.2).sum();
        let mut out = vec![0u8; total];
        let mut slices = Vec::with_capacity(layout.len());
        let mut rest = out.as_mut_slice();
        for &(_, _, isize) in &layout {
            let (head, tail) = rest.split_at_mut(isize);
            slices.push(head);
            rest = tail;
        }
        slices
            .into_par_iter()
            .zip(layout.par_iter())
            .try_for_each(|(dst, &(at, bsize, _))| {
                let cdata = &data[at + HEADER_LEN..at + bsize - TRAILER_LEN];
                DeflateDecoder::new(cdata).read_exact(dst)?;
                let t = &data[at + bsize - TRAILER_LEN..at + bsize - 4];
                let mut crc = Crc::new();
                crc.update(dst);
                if crc.sum() != u32::from_le_bytes([t[0], t[1], t[2], t[3]]) {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "gzip block CRC mismatch",
                    ));
                }
                Ok(())
            })?;
        return Ok(out);
    }
    // ISIZE (the last four bytes) is the uncompressed size mod 2^32: a good capacity hint.
    let hint = data
        .len()
        .checked_sub(4)
        .map(|n| u32::from_le_bytes([data[n], data[n + 1], data[n + 2], data[n + 3]]) as usize)
        .unwrap_or(0)
        .min(data.len().saturating_mul(1032)); // deflate's maximum ratio bounds a bogus trailer
    let mut out = Vec::with_capacity(hint);
    MultiGzDecoder::new(data).read_to_end(&mut out)?;
    Ok(out)
}

/// Whether `data`, gzip that inflates to `inflated_len` bytes, is a single member, as readers
/// that stop after the first member need (browsers' `DecompressionStream`, and so NiiVue). Blocked
/// gzip says so in its block layout; otherwise the last member's ISIZE (its size mod 2^32) equals
/// the whole stream's only when no member comes before it (or those before are empty).
pub fn is_one_member(data: &[u8], inflated_len: usize) -> bool {
    match blocks(data) {
        Some(b) => b.len() <= 1,
        None => data
            .len()
            .checked_sub(4)
            .is_some_and(|n| data[n..] == (inflated_len as u32).to_le_bytes()),
    }
}

/// Compresses `data` as one ordinary gzip member (level 1), for readers that stop after the first.
pub fn compress_one_member(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut enc =
        flate2::write::GzEncoder::new(Vec::with_capacity(data.len() / 4 + 64), Compression::fast());
    enc.write_all(data)?;
    enc.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_member_gzip_is_told_from_several() {
        let data: Vec<u8> = (0..3 * BLOCK_INPUT + 17).map(|i| (i % 251) as u8).collect();
        // Blocked gzip of several blocks, and two ordinary members one after the other (as
        // `cat a.gz b.gz` makes), are several; their one-member re-encoding is one.
        assert!(!is_one_member(&compress(&data).unwrap(), data.len()));
        let mut two = compress_one_member(&data[..1000]).unwrap();
        two.extend(compress_one_member(&data[1000..]).unwrap());
        assert!(!is_one_member(&two, data.len()));
        let one = compress_one_member(&decompress(&two).unwrap()).unwrap();
        assert!(is_one_member(&one, data.len()));
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&one[..])
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, data);
        // A file of one block is one member.
        assert!(is_one_member(&compress(&data[..100]).unwrap(), 100));
    }

    /// Regression: float32 probability maps written by `medseg segment` are nearly
    /// incompressible, and level-1 deflate grew a block past the 64 KiB a member may hold.
    #[test]
    fn incompressible_data_fits_its_blocks() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let data: Vec<u8> = (0..200_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let gz = compress(&data).unwrap();
        assert_eq!(decompress(&gz).unwrap(), data);
    }

    #[test]
    fn blocked_gzip_round_trips_and_reads_as_plain_gzip() {
        let data: Vec<u8> = (0..300_000u32).map(|i| ((i / 7) % 251) as u8).collect();
        let gz = compress(&data).unwrap();
        assert!(blocks(&gz).unwrap().len() > 1);
        assert_eq!(decompress(&gz).unwrap(), data);
        // An ordinary multi-member gzip reader sees the same bytes.
        let mut plain = Vec::new();
        MultiGzDecoder::new(&gz[..])
            .read_to_end(&mut plain)
            .unwrap();
        assert_eq!(plain, data);
        // A corrupted block is caught.
        let mut bad = gz.clone();
        let n = bad.len();
        bad[n - 20] ^= 0xff;
        assert!(decompress(&bad).is_err());
        assert_eq!(
            decompress(&compress(&[]).unwrap()).unwrap(),
            Vec::<u8>::new()
        );
    }
}
