//! The library runs the job: `TrainJob` end to end on the sample with a
//! recording observer (events, run directory, the same numbers as the
//! epoch loop called directly), then `EvaluateJob` and `PredictJob` on the
//! model it saved.

mod common;
use common::*;
use std::path::Path;
use vgg16_cpu::data::cifar::{self, Split};
use vgg16_cpu::features::cache::{self, CacheKey, Dtype};
use vgg16_cpu::features::Cached;
use vgg16_cpu::model::saved::SavedModel;
use vgg16_cpu::report::history::{EpochRecord, StageResult};
use vgg16_cpu::train::{self as tr, Inputs, State};
use vgg16_cpu::{EvaluateJob, Observer, PredictJob, Silent, TrainConfig, TrainJob};

/// Every event, as text, in order.
#[derive(Default)]
struct Recorder {
    events: Vec<String>,
    open: Option<(String, u64, u64)>,
}

impl Observer for Recorder {
    fn info(&mut self, line: &str) {
        self.events.push(format!("info {line}"));
    }
    fn begin(&mut self, task: &str, total: u64, _unit: &'static str) {
        assert!(self.open.is_none(), "phase {task} begins inside {:?}", self.open);
        self.open = Some((task.to_string(), total, 0));
    }
    fn advance(&mut self, n: u64, _msg: &str) {
        self.open.as_mut().expect("advance inside a phase").2 += n;
    }
    fn end(&mut self) {
        let (task, total, done) = self.open.take().expect("end of a phase");
        assert_eq!(done, total, "phase {task} advanced {done} of {total}");
        self.events.push(format!("phase {task} {total}"));
    }
    fn epoch(&mut self, r: &EpochRecord, epochs: usize) {
        self.events.push(format!("epoch {} {}/{epochs}", r.stage, r.epoch));
    }
    fn stage_done(&mut self, r: &StageResult) {
        self.events.push(format!("stage {}", r.stage));
    }
}

fn config() -> TrainConfig {
    small_recipe(21, 48, 20, 2)
}

#[test]
fn train_job_reports_writes_the_run_and_matches_the_loop() {
    let model = fake_vgg(6);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let mut job = TrainJob::new(
        config(),
        cifar::locate(&sample_dir()).unwrap(),
        model.clone(),
        out.clone(),
    );
    job.cache_dir = tmp.path().join("cache");
    let mut rec = Recorder::default();
    let done = job.run(&mut rec).unwrap();

    // Events: two cache builds, then stage 1 (one epoch), stage 2 (two).
    let phases: Vec<&str> = rec
        .events
        .iter()
        .filter(|e| !e.starts_with("info"))
        .map(String::as_str)
        .collect();
    assert_eq!(
        phases,
        [
            "phase cache 48",
            "phase cache 20",
            "phase stage 1 epoch 1/1 48",
            "epoch 1 1/1",
            "stage 1",
            "phase stage 2 epoch 1/2 48",
            "epoch 2 1/2",
            "phase stage 2 epoch 2/2 48",
            "epoch 2 2/2",
            "stage 2",
        ]
    );
    assert!(
        rec.events.iter().any(|e| e.starts_with("info cache: building")),
        "{:?}",
        rec.events
    );

    // The run directory is complete: the files of a run (model, stage-1
    // model, checkpoint, history, metrics, reports, plots), all there.
    assert_eq!(vgg16_cpu::train::job::RUN_FILES.len(), 12);
    for f in vgg16_cpu::train::job::RUN_FILES {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(
        metrics["stage2"]["test_accuracy"].as_f64().unwrap(),
        done.stage_results[1].test_accuracy
    );

    // The same numbers, bit for bit, as the epoch loop run by hand on the
    // cache the job built.
    let cfg = config();
    let src = cifar::locate(&sample_dir()).unwrap();
    let train = cifar::load_split(&src, Split::Train).unwrap();
    let test = cifar::load_split(&src, Split::Test).unwrap();
    let key = |d, n| CacheKey::new(&model.digest(), 32, d, n, Dtype::F32);
    let (ct, o1) = cache::open_or_build(&job.cache_dir, &key(&train, 48), &model, &train, 16, &mut Silent).unwrap();
    let (ce, o2) = cache::open_or_build(&job.cache_dir, &key(&test, 20), &model, &test, 16, &mut Silent).unwrap();
    assert_eq!((o1, o2), (cache::Outcome::Hit, cache::Outcome::Hit));
    let (tidx, eidx): (Vec<usize>, Vec<usize>) = ((0..48).collect(), (0..20).collect());
    let inputs = Inputs {
        train: &Cached(&ct),
        train_flipped: None,
        train_idx: &tidx,
        val: &Cached(&ce),
        val_idx: &eidx,
        test: None,
    };
    let mut s = State::new(&model, &cfg);
    tr::run(&cfg, &inputs, &mut s, &mut |_| Ok(()), &mut Silent).unwrap();
    assert_eq!(history_numbers(&s.history), history_numbers(&done.history));

    // Evaluate the saved model: through the cache and through the whole
    // network, the stage-2 test numbers again.
    let saved = SavedModel::load(&out).unwrap();
    for cache_dir in [Some(job.cache_dir.clone()), None] {
        let ev = EvaluateJob {
            model: &saved,
            data: &test,
            records: 20,
            batch_size: 7,
            cache_dir: cache_dir.clone(),
        }
        .run(&mut Silent)
        .unwrap();
        assert_eq!(ev.cache.is_some(), cache_dir.is_some());
        assert_eq!(ev.report.samples, 20);
        assert!(
            (ev.report.accuracy - done.stage_results[1].test_accuracy).abs() < 1e-12,
            "{} vs {}",
            ev.report.accuracy,
            done.stage_results[1].test_accuracy
        );
        assert!(
            (ev.report.loss - done.stage_results[1].test_loss).abs() <= 1e-4 * done.stage_results[1].test_loss.abs(),
            "{} vs {}",
            ev.report.loss,
            done.stage_results[1].test_loss
        );
    }

    // Predict: a readable image and a broken one, each answered in order.
    let png = tmp.path().join("a.png");
    image::RgbImage::from_fn(40, 30, |x, y| image::Rgb([(x * 6) as u8, (y * 8) as u8, 90]))
        .save(&png)
        .unwrap();
    let broken = tmp.path().join("broken.png");
    std::fs::write(&broken, b"not a png").unwrap();
    let images = vec![png.clone(), broken.clone()];
    let mut answers = Vec::new();
    let failed = PredictJob {
        model: &saved,
        images: &images,
        top_k: 3,
        batch_size: 4,
    }
    .run(|p: &Path, a| answers.push((p.to_path_buf(), a.map_err(|e| e.to_string()))));
    assert_eq!(failed, 1);
    assert_eq!(answers.len(), 2);
    let err = answers
        .iter()
        .find(|(p, _)| *p == broken)
        .unwrap()
        .1
        .as_ref()
        .unwrap_err();
    assert!(err.contains("broken.png"), "{err}");
    let top = answers.iter().find(|(p, _)| *p == png).unwrap().1.as_ref().unwrap();
    assert_eq!(top.len(), 3);
    assert!(top.windows(2).all(|w| w[0].1 >= w[1].1), "{top:?}");
}

#[test]
fn resume_job_refuses_a_directory_without_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let e = TrainJob::resume(tmp.path(), cifar::locate(&sample_dir()).unwrap(), fake_vgg(1))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("checkpoint.json") && e.contains("no checkpoint"), "{e}");
}
