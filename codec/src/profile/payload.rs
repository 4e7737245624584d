//! Bounded little-endian reading and varint writing for layer payloads of the lossy
//! profiles. Every read checks its bounds and returns [`CodecError::Corrupt`] on short
//! input, so payload parsers stay free of index panics.

use crate::error::CodecError;

/// A cursor over an untrusted layer payload.
pub(crate) struct PayloadReader<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// Which profile is reading, for error messages.
    what: &'static str,
}

impl<'a> PayloadReader<'a> {
    pub(crate) fn new(bytes: &'a [u8], what: &'static str) -> Self {
        PayloadReader { bytes, pos: 0, what }
    }

    fn short(&self, n: usize) -> CodecError {
        CodecError::Corrupt(format!(
            "{} layer payload truncated: need {} bytes at offset {}, have {}",
            self.what,
            n,
            self.pos,
            self.bytes.len()
        ))
    }

    /// The next `n` bytes.
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        let bytes: &'a [u8] = self.bytes;
        match self.pos.checked_add(n).and_then(|end| bytes.get(self.pos..end)) {
            Some(s) => {
                self.pos += n;
                Ok(s)
            }
            None => Err(self.short(n)),
        }
    }

    /// Unread bytes left.
    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len().saturating_sub(self.pos)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u32(&mut self) -> Result<u32, CodecError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn f32(&mut self) -> Result<f32, CodecError> {
        Ok(f32::from_bits(self.u32()?))
    }

    /// An LEB128 varint of at most 5 bytes that fits in u32.
    pub(crate) fn varint(&mut self) -> Result<u32, CodecError> {
        let (v, n) = read_varint(&self.bytes[self.pos.min(self.bytes.len())..]).ok_or_else(|| {
            CodecError::Corrupt(format!(
                "{} layer payload: bad varint at offset {}",
                self.what, self.pos
            ))
        })?;
        self.pos += n;
        Ok(v)
    }

    /// A zigzag-coded signed varint.
    pub(crate) fn svarint(&mut self) -> Result<i32, CodecError> {
        Ok(unzigzag(self.varint()?))
    }

    /// Errors unless every byte was read.
    pub(crate) fn finish(&self) -> Result<(), CodecError> {
        if self.remaining() != 0 {
            return Err(CodecError::Corrupt(format!(
                "{} layer payload has {} unread bytes",
                self.what,
                self.remaining()
            )));
        }
        Ok(())
    }
}

/// Reads an LEB128 varint (at most 5 bytes, value within u32) from the start of `b`,
/// returning the value and the bytes used.
pub(crate) fn read_varint(b: &[u8]) -> Option<(u32, usize)> {
    let mut v: u64 = 0;
    for (i, &byte) in b.iter().take(5).enumerate() {
        v |= u64::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return u32::try_from(v).ok().map(|v| (v, i + 1));
        }
    }
    None
}

/// Appends `v` as an LEB128 varint.
pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u32) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Appends `v` zigzag-coded as an LEB128 varint.
pub(crate) fn put_svarint(out: &mut Vec<u8>, v: i32) {
    put_varint(out, zigzag(v));
}

pub(crate) fn zigzag(v: i32) -> u32 {
    ((v << 1) ^ (v >> 31)) as u32
}

pub(crate) fn unzigzag(v: u32) -> i32 {
    ((v >> 1) as i32) ^ -((v & 1) as i32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn varints_round_trip(v in any::<i32>()) {
            let mut b = Vec::new();
            put_svarint(&mut b, v);
            let mut r = PayloadReader::new(&b, "test");
            prop_assert_eq!(r.svarint()?, v);
            prop_assert!(r.finish().is_ok());
        }

        #[test]
        fn garbage_never_panics(b in prop::collection::vec(any::<u8>(), 0..12)) {
            let mut r = PayloadReader::new(&b, "test");
            let _ = r.varint();
            let _ = r.u32();
            let _ = r.take(usize::MAX);
        }
    }

    #[test]
    fn overlong_varints_are_refused() {
        assert_eq!(read_varint(&[0x80, 0x80, 0x80, 0x80, 0x10]), None);
        assert_eq!(read_varint(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x01]), None);
        assert_eq!(read_varint(&[0xFF, 0xFF, 0xFF, 0xFF, 0x0F]), Some((u32::MAX, 5)));
        assert_eq!(read_varint(&[0x80]), None);
    }
}
