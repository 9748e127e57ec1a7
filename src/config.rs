//! The recipe's settings, as saved in checkpoints, metrics.json and the
//! saved model. Plain data: every layer (training, checkpoints, saved
//! models, reports) reads them from here.

use serde::{Deserialize, Serialize};

/// One stage's SGD settings.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct StageConfig {
    pub lr: f64,
    pub momentum: f64,
    pub batch_size: usize,
    pub epochs: usize,
    /// L2 penalty on the kernels (not biases): the gradient gets
    /// `weight_decay * w` added. 0 in the seed recipe.
    #[serde(default)]
    pub weight_decay: f64,
    /// How the learning rate moves over the stage's steps.
    #[serde(default)]
    pub schedule: Schedule,
    /// Steps of linear warm-up at the start of the stage, in epochs.
    #[serde(default)]
    pub warmup_epochs: usize,
    /// Label smoothing of this stage's cross-entropy targets (0: none).
    #[serde(default)]
    pub label_smoothing: f64,
}

impl StageConfig {
    /// Plain (momentum) SGD at a constant rate: the seed recipe's kind.
    pub fn sgd(lr: f64, momentum: f64, batch_size: usize, epochs: usize) -> StageConfig {
        StageConfig {
            lr,
            momentum,
            batch_size,
            epochs,
            weight_decay: 0.0,
            schedule: Schedule::Constant,
            warmup_epochs: 0,
            label_smoothing: 0.0,
        }
    }

    /// The learning rate of step `t` (0-based) of `total` in this stage,
    /// with `per_epoch` steps an epoch.
    pub fn lr_at(&self, t: usize, total: usize, per_epoch: usize) -> f64 {
        let warm = self.warmup_epochs * per_epoch;
        if t < warm {
            return self.lr * (t + 1) as f64 / warm as f64;
        }
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Cosine => {
                let span = total.saturating_sub(warm).max(1) as f64;
                let x = (t - warm) as f64 / span;
                0.5 * self.lr * (1.0 + (std::f64::consts::PI * x).cos())
            }
        }
    }
}

/// Learning-rate schedule of a stage.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// The same rate every step (the seed recipe).
    #[default]
    Constant,
    /// Cosine decay from `lr` to 0 over the stage (after any warm-up).
    Cosine,
}

impl Schedule {
    pub fn parse(s: &str) -> Option<Schedule> {
        match s {
            "constant" => Some(Schedule::Constant),
            "cosine" => Some(Schedule::Cosine),
            _ => None,
        }
    }
}

/// The whole recipe: both stages, the head, the seed and which records.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    pub image_size: usize,
    pub stage1: StageConfig,
    pub stage2: StageConfig,
    pub hidden: Option<usize>,
    pub dropout: f32,
    pub seed: u64,
    pub classes: usize,
    /// Which records: the first N of each split, and the held-out fraction
    /// of the training records used for validation (None: validate on the
    /// test split). Kept here so `--resume` uses the same data.
    #[serde(default)]
    pub limit_train: Option<usize>,
    #[serde(default)]
    pub limit_test: Option<usize>,
    #[serde(default)]
    pub validation_split: Option<f64>,
    /// "seed" (Keras's recipe, exactly) or "tuned"; the settings below and
    /// above are what counts, this names where they came from.
    #[serde(default = "seed_name")]
    pub recipe: String,
    /// Standardize the GAP features the head sees with the training
    /// features' per-channel mean and standard deviation (a fixed layer in
    /// front of the head; folded into the saved head's first Dense).
    #[serde(default)]
    pub standardize: bool,
    /// Files written before label smoothing was set per stage (see
    /// [`StageConfig::label_smoothing`]) held one value for both stages
    /// here. Read, never written: [`TrainConfig::upgrade`] moves it into
    /// the stages.
    #[serde(default, rename = "label_smoothing", skip_serializing)]
    pub legacy_label_smoothing: Option<f64>,
    /// At the end of each stage, go back to the epoch with the best
    /// validation accuracy (needs --validation-split: never the test set).
    #[serde(default)]
    pub restore_best: bool,
    /// Augment with horizontally flipped training images: a second cache
    /// view (built once, keyed on its own), each record's view drawn per
    /// epoch from the seed.
    #[serde(default)]
    pub flip: bool,
    /// Gradient accumulation: each rank computes its share of a batch in
    /// this many parts, one after another, before the step (the batch is
    /// cut into ranks x accumulate parts; see `train::parallel`). 1: whole.
    #[serde(default = "one")]
    pub accumulate: usize,
}

fn one() -> usize {
    1
}

fn seed_name() -> String {
    "seed".into()
}

impl TrainConfig {
    /// The seed recipe (Keras's): stage 1 SGD lr 0.01, batch 32, 2 epochs;
    /// stage 2 SGD lr 1e-4, momentum 0.9, batch 64, 5 epochs; GAP ->
    /// Dense(classes) head; seed 1337; every record; validate on the test split.
    pub fn recipe(image_size: usize, classes: usize) -> TrainConfig {
        TrainConfig {
            image_size,
            stage1: StageConfig::sgd(0.01, 0.0, 32, 2),
            stage2: StageConfig::sgd(1e-4, 0.9, 64, 5),
            hidden: None,
            dropout: 0.0,
            seed: 1337,
            classes,
            limit_train: None,
            limit_test: None,
            validation_split: None,
            recipe: seed_name(),
            standardize: false,
            legacy_label_smoothing: None,
            restore_best: false,
            flip: false,
            accumulate: 1,
        }
    }

    /// The tuned recipe (`--recipe tuned`): what measurably beat the seed
    /// recipe on the same cache (BENCHMARKS.md, section 8): the head on
    /// standardized features with momentum, weight decay and a cosine
    /// schedule over more epochs (stage 1 costs milliseconds an epoch on
    /// cached features); stage 2 from that head at 20x the seed's learning
    /// rate with warm-up, cosine decay and weight decay, on the training
    /// images and their mirrored view (section 8.2). Label smoothing was
    /// tried and left out: it cost stage 1 0.45 points and did not help
    /// stage 2 (section 8.4, 3 seeds each).
    pub fn tuned(image_size: usize, classes: usize) -> TrainConfig {
        let mut stage1 = StageConfig::sgd(0.01, 0.9, 256, 30);
        stage1.weight_decay = 1e-3;
        stage1.schedule = Schedule::Cosine;
        let mut stage2 = StageConfig::sgd(2e-3, 0.9, 64, 5);
        stage2.weight_decay = 5e-4;
        stage2.schedule = Schedule::Cosine;
        stage2.warmup_epochs = 1;
        TrainConfig {
            stage1,
            stage2,
            recipe: "tuned".into(),
            standardize: true,
            flip: true,
            ..TrainConfig::recipe(image_size, classes)
        }
    }

    /// A configuration read from a file written by an earlier version, in
    /// today's form: one label smoothing for both stages becomes each
    /// stage's (unless the file also set the stage's own).
    pub fn upgrade(mut self) -> TrainConfig {
        if let Some(ls) = self.legacy_label_smoothing.take() {
            for sc in [&mut self.stage1, &mut self.stage2] {
                if sc.label_smoothing == 0.0 {
                    sc.label_smoothing = ls;
                }
            }
        }
        self
    }

    /// Settings that cannot train, named as the command line spells them.
    pub fn check(&self) -> crate::Result<()> {
        crate::model::vgg::check_image_size(self.image_size)?;
        for (stage, sc) in [(1, &self.stage1), (2, &self.stage2)] {
            if sc.batch_size == 0 {
                crate::config_bail!("--stage{stage}-batch-size must be at least 1");
            }
            if !sc.lr.is_finite() || sc.lr <= 0.0 {
                crate::config_bail!("--stage{stage}-lr {}: must be a positive number", sc.lr);
            }
            if !sc.momentum.is_finite() || !(0.0..1.0).contains(&sc.momentum) {
                crate::config_bail!("--stage{stage}-momentum {}: must be in [0, 1)", sc.momentum);
            }
            if !sc.weight_decay.is_finite() || !(0.0..1.0).contains(&sc.weight_decay) {
                crate::config_bail!("--stage{stage}-weight-decay {}: must be in [0, 1)", sc.weight_decay);
            }
            if !sc.label_smoothing.is_finite() || !(0.0..1.0).contains(&sc.label_smoothing) {
                crate::config_bail!(
                    "--stage{stage}-label-smoothing {}: must be in [0, 1)",
                    sc.label_smoothing
                );
            }
            if sc.warmup_epochs > sc.epochs {
                crate::config_bail!(
                    "--stage{stage}-warmup-epochs {}: more than the stage's {} epochs",
                    sc.warmup_epochs,
                    sc.epochs
                );
            }
        }
        if self.accumulate == 0 {
            crate::config_bail!("--accumulate must be at least 1");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            crate::config_bail!("--dropout {}: must be in [0, 1)", self.dropout);
        }
        if self.hidden == Some(0) {
            crate::config_bail!("--hidden 0: a hidden layer needs at least 1 unit (leave --hidden out for none)");
        }
        if self.classes < 2 {
            crate::config_bail!("{} classes: a classifier needs at least 2", self.classes);
        }
        if self.classes > crate::data::folder::MAX_CLASSES {
            crate::config_bail!(
                "{} classes: at most {} are supported (labels are one byte)",
                self.classes,
                crate::data::folder::MAX_CLASSES
            );
        }
        for (name, v) in [("--limit-train", self.limit_train), ("--limit-test", self.limit_test)] {
            if v == Some(0) {
                crate::config_bail!("{name} 0: must be at least 1");
            }
        }
        if let Some(f) = self.validation_split {
            if !(0.0..1.0).contains(&f) {
                crate::config_bail!("--validation-split {f}: must be in [0, 1)");
            }
        }
        if self.restore_best && self.validation_split.is_some_and(|f| f <= 0.0) {
            crate::config_bail!(
                "--restore-best needs --validation-split F > 0: the best epoch is chosen on held-out training records, never on the test set"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file from before per-stage label smoothing: one top-level value
    /// for both stages, read into each; written back per stage only.
    #[test]
    fn one_label_smoothing_for_both_stages_is_read_into_each() {
        let mut c = TrainConfig::tuned(32, 10);
        c.stage1.label_smoothing = 0.1;
        c.stage2.label_smoothing = 0.1;
        let mut v = serde_json::to_value(c).unwrap();
        assert!(v.get("label_smoothing").is_none(), "{v}");
        for k in ["stage1", "stage2"] {
            assert_eq!(v[k]["label_smoothing"].as_f64(), Some(0.1), "{v}");
            v[k].as_object_mut().unwrap().remove("label_smoothing");
        }
        v["label_smoothing"] = serde_json::json!(0.25);
        let c: TrainConfig = serde_json::from_value(v).unwrap();
        let c = c.upgrade();
        assert_eq!((c.stage1.label_smoothing, c.stage2.label_smoothing), (0.25, 0.25));
        assert_eq!(c.legacy_label_smoothing, None);
        // A stage's own value wins over the old shared one.
        let mut v = serde_json::to_value(TrainConfig::recipe(32, 10)).unwrap();
        v["stage2"]["label_smoothing"] = serde_json::json!(0.05);
        v["label_smoothing"] = serde_json::json!(0.3);
        let c = serde_json::from_value::<TrainConfig>(v).unwrap().upgrade();
        assert_eq!((c.stage1.label_smoothing, c.stage2.label_smoothing), (0.3, 0.05));
        // Out of range, per stage, named as the flag.
        let mut c = TrainConfig::recipe(32, 10);
        c.stage2.label_smoothing = 1.0;
        let e = c.check().unwrap_err().to_string();
        assert!(e.contains("--stage2-label-smoothing 1"), "{e}");
    }
}
