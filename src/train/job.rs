//! [`TrainJob`]: the whole recipe as one library call, what `vgg16 train`
//! runs. Config in, run directory out:
//!
//! ```text
//! <run dir>/checkpoint.{npz,json}  after every epoch (resume from here)
//!           history.csv, history.png, metrics.json
//!           model_stage1.npz, model.npz
//!           test_report.{txt,json}, confusion_matrix.png
//!           comparison.{md,json}
//! ```

use crate::config::TrainConfig;
use crate::data::image::PREPROCESSING;
use crate::data::{DataSource, Split};
use crate::error::{IoContext, Result};
use crate::features::cache::dataset_digest;
use crate::features::cache::{self, Cache, CacheKey, Dtype, Shard};
use crate::features::{Cached, Features, Live};
use crate::model::saved::{ModelMeta, SavedModel, FORMAT, FORMAT_VERSION};
use crate::model::vgg::{auto_batch, Vgg16};
use crate::observer::Observer;
use crate::report::history::{write_history, write_text, EpochRecord, StageResult};
use crate::report::metrics::{self, Report};
use crate::train::checkpoint::{checkpoint_config, load_checkpoint, save_checkpoint, RunIdentity};
use crate::train::parallel::{Collective, Solo};
use crate::train::recipe::{self, Inputs, State};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The files a run directory holds when complete (the closing line lists
/// them; a fresh run refuses a directory that holds any).
pub const RUN_FILES: &[&str] = &[
    "checkpoint.npz",
    "checkpoint.json",
    "history.csv",
    "history.png",
    "metrics.json",
    "model_stage1.npz",
    "model.npz",
    "test_report.txt",
    "test_report.json",
    "confusion_matrix.png",
    "comparison.md",
    "comparison.json",
];

/// A training run: what to train on, with what, and where its files go.
pub struct TrainJob {
    pub config: TrainConfig,
    /// The dataset ([`crate::data::locate`]; a CIFAR-10 location converts
    /// with `.into()`).
    pub data: DataSource,
    /// The ImageNet base (blocks 1-4 frozen, block5 the starting point).
    pub base: Vgg16,
    /// The run directory.
    pub out: PathBuf,
    /// Continue the run in `out` from its checkpoint ([`TrainJob::resume`]).
    pub resume: bool,
    /// Where activation caches live.
    pub cache_dir: PathBuf,
    /// Storage type of cached block4 activations.
    pub cache_dtype: Dtype,
    /// false: recompute blocks 1-4 for every batch (`--no-cache`).
    pub use_cache: bool,
    /// Images per batch of the cache pass (None: [`auto_batch`]).
    pub forward_batch: Option<usize>,
    /// Replace a run already in `out` (a fresh run refuses otherwise).
    pub overwrite: bool,
    /// The ranks training together ([`crate::train::parallel`]): [`Solo`]
    /// for one process. Every rank runs the same job; rank 0 alone writes
    /// the run directory; caches are built in shards, one per rank.
    pub comm: Box<dyn Collective>,
}

/// What a finished run reports (its files are in `out`).
#[derive(Debug)]
pub struct TrainOutcome {
    pub out: PathBuf,
    pub history: Vec<EpochRecord>,
    pub stage_results: Vec<StageResult>,
    /// The test report of the last stage run in this process.
    pub test_report: Option<Report>,
    /// comparison.md's text.
    pub comparison: String,
    pub cache_seconds: f64,
    pub total_seconds: f64,
}

impl TrainJob {
    /// A fresh run of `config` into `out`, with the default cache settings
    /// (`data/cache`, f32).
    pub fn new(config: TrainConfig, data: impl Into<DataSource>, base: Vgg16, out: PathBuf) -> TrainJob {
        TrainJob {
            config,
            data: data.into(),
            base,
            out,
            resume: false,
            cache_dir: PathBuf::from("data/cache"),
            cache_dtype: Dtype::F32,
            use_cache: true,
            forward_batch: None,
            overwrite: false,
            comm: Box::new(Solo),
        }
    }

    /// Continues the run in `dir` with the configuration its checkpoint
    /// was made with.
    pub fn resume(dir: &Path, data: impl Into<DataSource>, base: Vgg16) -> Result<TrainJob> {
        let (config, _) = checkpoint_config(dir)?;
        Ok(TrainJob {
            resume: true,
            ..TrainJob::new(config, data, base, dir.to_path_buf())
        })
    }

    /// Runs the recipe to the end: cache, stage 1, stage 2, test, report.
    /// A fresh run that fails before writing anything leaves no run
    /// directory behind.
    pub fn run(&self, obs: &mut dyn Observer) -> Result<TrainOutcome> {
        let created = !self.out.exists();
        let r = self.run_inner(obs);
        if r.is_err() && created {
            // Only if still empty (remove_dir refuses otherwise).
            let _ = std::fs::remove_dir(&self.out);
        }
        r
    }

    fn run_inner(&self, obs: &mut dyn Observer) -> Result<TrainOutcome> {
        let t_start = Instant::now();
        let cfg = &self.config;
        let out = &self.out;
        let mut state = if self.resume {
            let (_, st) = load_checkpoint(out)?;
            obs.info(&format!(
                "resuming {} at stage {} after epoch {} (its saved configuration is used)",
                out.display(),
                st.stage,
                st.epochs_done
            ));
            Some(st)
        } else {
            cfg.check()?;
            let files: Vec<&str> = RUN_FILES.iter().copied().filter(|f| out.join(f).exists()).collect();
            if !files.is_empty() && !self.overwrite {
                crate::config_bail!(
                    "{} already holds a run ({}): continue it with --resume {}, replace it with --overwrite, or choose another --out",
                    out.display(),
                    files.join(", "),
                    out.display()
                );
            }
            None
        };
        let comm = &*self.comm;
        let writer = comm.rank() == 0;
        if writer {
            std::fs::create_dir_all(out).at("cannot create run directory", out)?;
        }
        if comm.size() > 1 {
            let parts = comm.size() * cfg.accumulate;
            obs.info(&format!(
                "data parallel: {}; each batch in {parts} parts ({} per rank), gradients summed in rank order{}",
                comm.describe(),
                cfg.accumulate,
                if comm.overlap() {
                    ", each layer's while the layers below run backward"
                } else {
                    ""
                }
            ));
        } else if cfg.accumulate > 1 {
            obs.info(&format!(
                "each batch in {} parts (--accumulate), gradients summed in order",
                cfg.accumulate
            ));
        }
        let model = &self.base;
        let digest = model.digest();
        obs.info(&format!("loading {} ...", self.data.describe()));
        let train_ds = self.data.load(Split::Train)?;
        let test_ds = self.data.load(Split::Test)?;
        if cfg.classes != train_ds.class_names.len() {
            crate::config_bail!(
                "the configuration has {} classes, the dataset {} ({})",
                cfg.classes,
                train_ds.class_names.len(),
                self.data.describe()
            );
        }
        let n_train = cfg.limit_train.unwrap_or(train_ds.len()).min(train_ds.len());
        let n_test = cfg.limit_test.unwrap_or(test_ds.len()).min(test_ds.len());
        if train_ds.has_validation_folder() && cfg.validation_split.is_some() {
            crate::config_bail!(
                "{} has its own validation folder: drop --validation-split (its records are the validation set)",
                self.data.path().display()
            );
        }
        let (train_idx, val_from_train): (Vec<usize>, Vec<usize>) = match cfg.validation_split {
            Some(f) => train_ds.validation_split(n_train, f),
            None if train_ds.has_validation_folder() => train_ds.validation_split(n_train, 0.0),
            None => ((0..n_train).collect(), vec![]),
        };
        let test_idx: Vec<usize> = (0..n_test).collect();
        let identity = RunIdentity {
            weights_digest: digest.clone(),
            train_digest: dataset_digest(&train_ds),
            test_digest: dataset_digest(&test_ds),
        };
        if self.resume {
            if let (_, Some(saved)) = checkpoint_config(out)? {
                let differs: Vec<&str> = [
                    ("base weights", saved.weights_digest != identity.weights_digest),
                    ("training data", saved.train_digest != identity.train_digest),
                    ("test data", saved.test_digest != identity.test_digest),
                ]
                .into_iter()
                .filter_map(|(what, d)| d.then_some(what))
                .collect();
                if !differs.is_empty() {
                    crate::config_bail!(
                        "{}: this run was trained on other {} than --data {} and --weights give now; resume it with the same ones",
                        out.display(),
                        differs.join(" and "),
                        self.data.path().display()
                    );
                }
            }
        }
        let held_out = cfg.validation_split.is_some() || train_ds.has_validation_folder();
        if cfg.restore_best && !held_out {
            crate::config_bail!(
                "--restore-best needs --validation-split F (or a folder with its own val/): the best epoch is chosen on held-out training records, never on the test set"
            );
        }
        obs.info(&format!(
            "training on {} records, validating on {} {} records, testing on {n_test}; {}x{} input; run directory {}",
            train_idx.len(),
            if held_out { val_from_train.len() } else { n_test },
            if held_out { "held-out training" } else { "test" },
            cfg.image_size,
            cfg.image_size,
            out.display()
        ));

        // Blocks 1-4, once: the activation cache (or the network per batch).
        let fwd_batch = self.forward_batch.unwrap_or(auto_batch(cfg.image_size)).max(1);
        let t_cache = Instant::now();
        // The mirrored view of the training split (--flip): its own cache.
        let train_flipped = cfg.flip.then(|| train_ds.flipped());
        let caches: Option<(Cache, Cache, Option<Cache>)> = if self.use_cache {
            let key = |ds, n| CacheKey::new(&digest, cfg.image_size, ds, n, self.cache_dtype);
            if comm.size() > 1 {
                // Each rank builds its shard of every cache; the last to
                // finish seals it; then all open the sealed caches.
                let shard = Shard {
                    index: comm.rank(),
                    count: comm.size(),
                };
                let mut splits = vec![(&train_ds, n_train), (&test_ds, n_test)];
                if let Some(ds) = &train_flipped {
                    splits.push((ds, n_train));
                }
                for (ds, n) in splits {
                    cache::build_shard(&self.cache_dir, &key(ds, n), model, ds, fwd_batch, shard, obs)?;
                    comm.barrier()?;
                }
            }
            let (ctr, _) = cache::open_or_build(
                &self.cache_dir,
                &key(&train_ds, n_train),
                model,
                &train_ds,
                fwd_batch,
                obs,
            )?;
            let (cte, _) =
                cache::open_or_build(&self.cache_dir, &key(&test_ds, n_test), model, &test_ds, fwd_batch, obs)?;
            let cfl = match &train_flipped {
                Some(ds) => {
                    Some(cache::open_or_build(&self.cache_dir, &key(ds, n_train), model, ds, fwd_batch, obs)?.0)
                }
                None => None,
            };
            Some((ctr, cte, cfl))
        } else {
            obs.info("--no-cache: blocks 1-4 run for every batch of every epoch (as Keras does)");
            None
        };
        let cache_seconds = t_cache.elapsed().as_secs_f64();
        let live_train = Live::new(model, &train_ds, cfg.image_size, n_train);
        let live_test = Live::new(model, &test_ds, cfg.image_size, n_test);
        let live_flipped = train_flipped
            .as_ref()
            .map(|ds| Live::new(model, ds, cfg.image_size, n_train));
        let cached = caches
            .as_ref()
            .map(|(a, b, f)| (Cached(a), Cached(b), f.as_ref().map(Cached)));
        let (ftrain, ftest, fflip): (&dyn Features, &dyn Features, Option<&dyn Features>) = match &cached {
            Some((a, b, f)) => (a, b, f.as_ref().map(|f| f as &dyn Features)),
            None => (
                &live_train,
                &live_test,
                live_flipped.as_ref().map(|f| f as &dyn Features),
            ),
        };
        let inputs = Inputs {
            train: ftrain,
            train_flipped: fflip,
            train_idx: &train_idx,
            val: if held_out { ftrain } else { ftest },
            val_idx: if held_out { &val_from_train } else { &test_idx },
            test: held_out.then_some((ftest, &test_idx[..])),
        };

        // Stages 1 and 2, checkpointed after every epoch; each stage's
        // model saved when it ends.
        let mut state = state.take().unwrap_or_else(|| State::new(model, cfg));
        let model_meta = |s: &State, stage: u8| ModelMeta {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            stage,
            image_size: cfg.image_size,
            preprocessing: PREPROCESSING.into(),
            resize: train_ds.resize().name().into(),
            class_names: train_ds.class_names.clone(),
            base_weights_digest: digest.clone(),
            hidden: cfg.hidden,
            history: s.history.clone(),
            config: Some(cfg.clone()),
        };
        let mut on_epoch = |s: &State| -> Result<()> {
            if !writer {
                return Ok(());
            }
            save_checkpoint(out, cfg, Some(&identity), s)?;
            write_history(&out.join("history.csv"), &s.history)?;
            if let Some(r) = s.stage_results.last() {
                let file = if r.stage == 1 { "model_stage1.npz" } else { "model.npz" };
                let p = out.join(file);
                if !p.exists() || r.stage == 2 {
                    SavedModel::new(model, &s.block5, &s.head, model_meta(s, r.stage)).save(&p)?;
                }
            }
            Ok(())
        };
        recipe::run_parallel(cfg, &inputs, &mut state, &mut on_epoch, obs, comm)?;
        let total_seconds = t_start.elapsed().as_secs_f64();

        // The recipe's last steps: metrics, curves, confusion matrix, and
        // the comparison of the two stages.
        let stage = |n: u8| state.stage_results.iter().find(|r| r.stage == n).cloned();
        let metrics = json!({
            "stage1": stage(1),
            "stage2": stage(2),
            "cache_seconds": cache_seconds,
            "total_seconds": total_seconds,
            "image_size": cfg.image_size,
            "train_records": train_idx.len(),
            "test_records": n_test,
            "cached": self.use_cache,
            "ranks": comm.size(),
            "config": cfg,
        });
        let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).expect("plain data");
        let (md, js) =
            crate::report::comparison::comparison(cache_seconds, self.use_cache, &state.stage_results, total_seconds);
        let mut test_report = None;
        // Rank 0 writes the run directory; the others only computed.
        if writer {
            write_text(&out.join("metrics.json"), &pretty(&metrics))?;
            crate::report::plots::plot_history(&state.history, &out.join("history.png"))?;
            write_text(&out.join("comparison.md"), &md)?;
            write_text(&out.join("comparison.json"), &pretty(&js))?;
        }
        if let (true, Some((st, logits))) = (writer, state.test_logits.last()) {
            let rep = metrics::report(logits, &test_ds.labels[..n_test], &test_ds.class_names);
            write_text(&out.join("test_report.txt"), &rep.text())?;
            write_text(
                &out.join("test_report.json"),
                &serde_json::to_string_pretty(&rep).expect("plain data"),
            )?;
            let title = format!(
                "confusion matrix: stage {st}, {n_test} test images, accuracy {:.2}%",
                100.0 * rep.accuracy
            );
            crate::report::plots::plot_confusion(
                &rep.confusion_matrix,
                &test_ds.class_names,
                &title,
                &out.join("confusion_matrix.png"),
            )?;
            test_report = Some(rep);
        }
        Ok(TrainOutcome {
            out: out.clone(),
            history: state.history,
            stage_results: state.stage_results,
            test_report,
            comparison: md,
            cache_seconds,
            total_seconds,
        })
    }
}
