//! The streaming .npy writer, read back by an independent reader
//! (ndarray-npy), including the long-header (format 2.0) case.

use ndarray::{Array1, Array3, ArrayD};
use ndarray_npy::read_npy;
use vgg16_cpu::npy::{header, NpyStream};

#[test]
fn streamed_f32_and_u8_read_back() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("a.npy");
    let mut w = NpyStream::<f32, _>::new(std::fs::File::create(&p).unwrap(), &[2, 3, 4]).unwrap();
    let data: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
    w.write(&data[..10]).unwrap();
    w.write(&data[10..]).unwrap();
    w.finish().unwrap();
    let back: Array3<f32> = read_npy(&p).unwrap();
    assert_eq!(back.into_raw_vec_and_offset().0, data);

    let q = tmp.path().join("b.npy");
    let mut w = NpyStream::<u8, _>::new(std::fs::File::create(&q).unwrap(), &[5]).unwrap();
    w.write(&[9, 8, 7, 6, 5]).unwrap();
    w.finish().unwrap();
    let back: Array1<u8> = read_npy(&q).unwrap();
    assert_eq!(back.to_vec(), vec![9, 8, 7, 6, 5]);
}

#[test]
fn wrong_counts_are_errors() {
    let mut w = NpyStream::<f32, _>::new(Vec::new(), &[2, 2]).unwrap();
    w.write(&[1.0, 2.0, 3.0]).unwrap();
    assert!(w.write(&[1.0, 2.0]).is_err(), "past the declared shape");
    let w = NpyStream::<f32, _>::new(Vec::new(), &[2, 2]).unwrap();
    assert!(w.finish().is_err(), "short of the declared shape");
}

#[test]
fn headers_align_data_to_64_bytes_and_long_shapes_work() {
    for shape in [vec![1usize], vec![50000, 14, 14, 512], vec![3; 40]] {
        let h = header::<f32>(&shape);
        assert_eq!(h.len() % 64, 0, "{shape:?}");
    }
    // Many dimensions: still readable.
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("c.npy");
    let shape = vec![1usize; 30];
    let mut w = NpyStream::<f32, _>::new(std::fs::File::create(&p).unwrap(), &shape).unwrap();
    w.write(&[4.25]).unwrap();
    w.finish().unwrap();
    let back: ArrayD<f32> = read_npy(&p).unwrap();
    assert_eq!(back.shape(), shape.as_slice());
}
