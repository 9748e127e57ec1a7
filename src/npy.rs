//! Streaming `.npy` writing: a header for a known dtype and shape, then the
//! raw little-endian data in as many pieces as the caller likes. (Whole-array
//! reads and memory-mapped views go through ndarray-npy.)

use std::io::{self, Write};

/// The element types we stream.
pub trait NpyElem: Copy {
    /// NumPy's type string, e.g. "<f4".
    const DESCR: &'static str;
    fn extend_le(src: &[Self], out: &mut Vec<u8>);
}

impl NpyElem for f32 {
    const DESCR: &'static str = "<f4";
    fn extend_le(src: &[f32], out: &mut Vec<u8>) {
        out.reserve(src.len() * 4);
        for v in src {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

impl NpyElem for u8 {
    const DESCR: &'static str = "|u1";
    fn extend_le(src: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(src);
    }
}

impl NpyElem for half::f16 {
    const DESCR: &'static str = "<f2";
    fn extend_le(src: &[half::f16], out: &mut Vec<u8>) {
        out.reserve(src.len() * 2);
        for v in src {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

/// The header of a C-order `.npy` (format 1.0, or 2.0 if the header is
/// long), padded so the data starts on a 64-byte boundary.
pub fn header<T: NpyElem>(shape: &[usize]) -> Vec<u8> {
    let dims = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!(
            "({})",
            shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
        ),
    };
    let mut dict = format!("{{'descr': '{}', 'fortran_order': False, 'shape': {dims}, }}", T::DESCR);
    let v1 = dict.len() + 1 + 10 <= u16::MAX as usize;
    let prefix = if v1 { 10 } else { 12 };
    let total = (prefix + dict.len() + 1).div_ceil(64) * 64;
    dict.push_str(&" ".repeat(total - prefix - dict.len() - 1));
    dict.push('\n');
    let mut out = b"\x93NUMPY".to_vec();
    if v1 {
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&[2, 0]);
        out.extend_from_slice(&(dict.len() as u32).to_le_bytes());
    }
    out.extend_from_slice(dict.as_bytes());
    out
}

/// Writes the header now; `write` appends data; `finish` checks the count.
pub struct NpyStream<T: NpyElem, W: Write> {
    w: W,
    expected: usize,
    written: usize,
    buf: Vec<u8>,
    _t: std::marker::PhantomData<T>,
}

impl<T: NpyElem, W: Write> NpyStream<T, W> {
    pub fn new(mut w: W, shape: &[usize]) -> io::Result<Self> {
        w.write_all(&header::<T>(shape))?;
        Ok(NpyStream {
            w,
            expected: shape.iter().product(),
            written: 0,
            buf: Vec::new(),
            _t: Default::default(),
        })
    }

    pub fn write(&mut self, data: &[T]) -> io::Result<()> {
        if self.written + data.len() > self.expected {
            return Err(io::Error::other(format!(
                "npy: {} elements past the declared {}",
                self.written + data.len(),
                self.expected
            )));
        }
        self.buf.clear();
        T::extend_le(data, &mut self.buf);
        self.w.write_all(&self.buf)?;
        self.written += data.len();
        Ok(())
    }

    pub fn finish(mut self) -> io::Result<W> {
        if self.written != self.expected {
            return Err(io::Error::other(format!(
                "npy: {} elements written, {} declared",
                self.written, self.expected
            )));
        }
        self.w.flush()?;
        Ok(self.w)
    }
}

/// Byte offset of the data in a `.npy` written by [`header`].
pub fn data_offset<T: NpyElem>(shape: &[usize]) -> usize {
    header::<T>(shape).len()
}
