//! Data parallelism without MPI: ranks as threads of one process
//! ([`Threads`]) run the same algorithm the MPI transport does. N ranks
//! must reproduce one process with `accumulate = N` bit for bit, and stay
//! within float rounding of whole batches.

mod common;
use common::*;
use vgg16_cpu::data::cifar::{self, Split};
use vgg16_cpu::features::{Features, Live};
use vgg16_cpu::train::parallel::{part_rows, rank_rows, sum_in_rank_order, Collective, InTurn, Threads};
use vgg16_cpu::train::recipe::{self as tr, Inputs, State};
use vgg16_cpu::{Observer, StageConfig, TrainConfig};

/// Keeps the info lines (the gradient exchange's summary per epoch).
#[derive(Default)]
struct Lines(Vec<String>);

impl Observer for Lines {
    fn info(&mut self, line: &str) {
        self.0.push(line.to_string());
    }
}

#[test]
fn sum_in_rank_order_is_the_left_to_right_sum() {
    // Values of very different sizes, so the order of the additions shows.
    for (ranks, len) in [(2usize, 1usize), (3, 1001), (4, 7), (5, 3)] {
        let bufs: Vec<Vec<f32>> = (0..ranks)
            .map(|r| {
                let mut g = rng(40 + r as u64);
                rand_vec(&mut g, len, -1.0, 1.0)
                    .into_iter()
                    .enumerate()
                    .map(|(i, v)| v * 10f32.powi(((i + r) % 9) as i32 - 4))
                    .collect()
            })
            .collect();
        let want: Vec<f32> = (0..len)
            .map(|i| bufs.iter().skip(1).fold(bufs[0][i], |a, b| a + b[i]))
            .collect();
        let got: Vec<Vec<f32>> = std::thread::scope(|s| {
            let hs: Vec<_> = Threads::group(ranks)
                .into_iter()
                .zip(&bufs)
                .map(|(c, b)| {
                    s.spawn(move || {
                        let mut b = b.clone();
                        sum_in_rank_order(&c, &mut b).unwrap();
                        b
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (r, g) in got.iter().enumerate() {
            let same = g.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "{ranks} ranks, length {len}: rank {r} differs from the left-to-right sum"
            );
        }
    }
}

#[test]
fn rank_rows_are_whole_batches_in_order_and_parts_cover_the_batch() {
    for len in [0usize, 1, 5, 63, 64, 65, 300] {
        for batch in [1usize, 7, 64] {
            for size in 1..=5 {
                let mut next = 0;
                for r in 0..size {
                    let rr = rank_rows(len, batch, r, size);
                    assert_eq!(rr.start, next, "len {len} batch {batch} size {size} rank {r}");
                    assert!(rr.start.is_multiple_of(batch) || rr.start == len);
                    next = rr.end;
                }
                assert_eq!(next, len);
            }
        }
    }
    for b in [1usize, 2, 5, 64] {
        for parts in 1..=6 {
            let rows: Vec<usize> = (0..parts).flat_map(|p| part_rows(b, parts, p)).collect();
            assert_eq!(rows, (0..b).collect::<Vec<_>>(), "batch {b} in {parts} parts");
        }
    }
}

/// A small run with every part that draws randomness or changes the
/// gradient: a hidden layer with dropout, the mirrored view, weight decay,
/// label smoothing, a last batch smaller than the part count.
fn config(accumulate: usize) -> TrainConfig {
    let mut c = TrainConfig::tuned(32, 10);
    c.stage1 = StageConfig {
        epochs: 2,
        batch_size: 8,
        label_smoothing: 0.1,
        ..c.stage1
    };
    c.stage2 = StageConfig {
        epochs: 1,
        batch_size: 8,
        label_smoothing: 0.1,
        ..c.stage2
    };
    c.hidden = Some(16);
    c.dropout = 0.25;
    c.seed = 21;
    c.accumulate = accumulate;
    c.check().unwrap();
    c
}

#[test]
fn ranks_reproduce_one_process_accumulating_as_many_parts() {
    let model = fake_vgg(8);
    let src = cifar::locate(&sample_dir()).unwrap();
    let train = cifar::load_split(&src, Split::Train).unwrap();
    let test = cifar::load_split(&src, Split::Test).unwrap();
    let flipped = train.flipped();
    // 33 records in batches of 8: the last batch has one row.
    let tidx: Vec<usize> = (0..33).collect();
    let eidx: Vec<usize> = (0..21).collect();
    let run_seen = |cfg: &TrainConfig, comm: &dyn Collective| -> (State, Vec<String>) {
        let ftr = Live::new(&model, &train, 32, 33);
        let ffl = Live::new(&model, &flipped, 32, 33);
        let fte = Live::new(&model, &test, 32, 21);
        let inputs = Inputs {
            train: &ftr,
            train_flipped: Some(&ffl as &dyn Features),
            train_idx: &tidx,
            val: &fte,
            val_idx: &eidx,
            test: None,
        };
        let mut s = State::new(&model, cfg);
        let mut seen = Lines::default();
        tr::run_parallel(cfg, &inputs, &mut s, &mut |_| Ok(()), &mut seen, comm).unwrap();
        (s, seen.0)
    };
    let run = |cfg: &TrainConfig, comm: &dyn Collective| run_seen(cfg, comm).0;
    let weights = |s: &State| -> Vec<u32> {
        let mut v: Vec<u32> = s
            .block5
            .iter()
            .flat_map(|p| p.w.iter().chain(p.b.iter()))
            .map(|x| x.to_bits())
            .collect();
        v.extend(
            s.head
                .tensors()
                .iter()
                .flat_map(|(_, t, _)| t.iter().map(|x| x.to_bits())),
        );
        v
    };
    // (ranks, parts per rank). With K = 1, N ranks are one process with
    // --accumulate N bit for bit. With K = 2 a rank adds its own two parts
    // first ((p0 + p1) + (p2 + p3), not ((p0 + p1) + p2) + p3), so there
    // the reference is the exchange after backward: the overlapped one
    // (which adds the first part to each layer of the second as backward
    // hands it over) must equal it bit for bit.
    for (ranks, k) in [(2usize, 1usize), (3, 1), (2, 2)] {
        let one = run(&config(ranks * k), &vgg16_cpu::train::parallel::Solo);
        let cfg = config(k);
        let mut in_turn: Vec<State> = vec![];
        // The whole gradient summed after backward, then each layer's
        // summed while backward runs (the default).
        for overlap in [false, true] {
            let runs: Vec<(State, Vec<String>)> = std::thread::scope(|s| {
                let hs: Vec<_> = Threads::group(ranks)
                    .into_iter()
                    .map(|c| {
                        let cfg = &cfg;
                        let run_seen = &run_seen;
                        s.spawn(move || {
                            if overlap {
                                run_seen(cfg, &c)
                            } else {
                                run_seen(cfg, &InTurn(c))
                            }
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for (r, (st, lines)) in runs.iter().enumerate() {
                let how = if overlap { "overlapped" } else { "after backward" };
                let (want, what) = if k == 1 {
                    (&one, format!("one process with --accumulate {ranks}"))
                } else if overlap {
                    (&in_turn[r], "the exchange after backward".to_string())
                } else {
                    (st, String::new())
                };
                assert_eq!(
                    history_numbers(&st.history),
                    history_numbers(&want.history),
                    "{ranks} ranks x {k} parts ({how}), rank {r}: history differs from {what}"
                );
                assert!(
                    weights(st) == weights(want),
                    "{ranks} ranks x {k} parts ({how}), rank {r}: weights differ from {what}"
                );
                assert!(
                    weights(st) == weights(&runs[0].0),
                    "{ranks} ranks x {k} parts ({how}): rank {r}'s weights differ from rank 0's"
                );
                assert_eq!(st.stage_results.len(), 2);
                // The path claimed was the path taken: every stage-2 step
                // of a rank with rows overlapped, or none did.
                let s2 = lines
                    .iter()
                    .find(|l| l.starts_with("stage 2 epoch 1: gradient exchange"))
                    .unwrap_or_else(|| panic!("no exchange summary in {lines:?}"));
                let steps = 33usize.div_ceil(8);
                let want = if overlap {
                    // The last batch has one row: only the last rank has it.
                    format!(
                        "({steps} steps, {} overlapped",
                        if r == ranks - 1 { steps } else { steps - 1 }
                    )
                } else {
                    format!("({steps} steps, 0 overlapped")
                };
                assert!(s2.contains(&want), "rank {r} ({how}): {s2:?} lacks {want:?}");
            }
            if !overlap {
                in_turn = runs.into_iter().map(|(s, _)| s).collect();
            }
        }
        // Training happened: block5 moved.
        assert_ne!(one.block5[2].w, model.convs[12].w);
    }
    // Parts change only the rounding: --accumulate 2 vs whole batches.
    let whole = run(&config(1), &vgg16_cpu::train::parallel::Solo);
    let two = run(&config(2), &vgg16_cpu::train::parallel::Solo);
    for (a, b) in whole.history.iter().zip(&two.history) {
        for (x, y, what) in [
            (a.train_loss, b.train_loss, "train loss"),
            (a.val_loss, b.val_loss, "val loss"),
        ] {
            assert!(
                (x - y).abs() <= 1e-4 * x.abs().max(1.0),
                "stage {} epoch {} {what}: whole batches {x} vs 2 parts {y}",
                a.stage,
                a.epoch
            );
        }
    }
    let (wa, wb) = (weights(&whole), weights(&two));
    let worst = wa
        .iter()
        .zip(&wb)
        .map(|(&a, &b)| (f32::from_bits(a) - f32::from_bits(b)).abs())
        .fold(0f32, f32::max);
    let scale = wa.iter().map(|&a| f32::from_bits(a).abs()).fold(0f32, f32::max);
    assert!(
        worst <= 1e-4 * scale,
        "weights: whole batches vs 2 parts differ by {worst} (largest {scale})"
    );
}

/// tests/mpi.rs runs the binary under `mpirun`; it needs the `mpi` build.
/// Reported as ignored (with the command) rather than passing unseen.
#[cfg(not(feature = "mpi"))]
#[test]
#[ignore = "the MPI tests need the mpi feature: cargo test --release --features mpi --test mpi"]
fn mpi_tests_need_the_mpi_feature() {}
