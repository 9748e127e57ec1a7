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
}

impl TrainConfig {
    /// The seed recipe (Keras's): stage 1 SGD lr 0.01, batch 32, 2 epochs;
    /// stage 2 SGD lr 1e-4, momentum 0.9, batch 64, 5 epochs; GAP ->
    /// Dense(classes) head; seed 1337; every record; validate on the test split.
    pub fn recipe(image_size: usize, classes: usize) -> TrainConfig {
        TrainConfig {
            image_size,
            stage1: StageConfig {
                lr: 0.01,
                momentum: 0.0,
                batch_size: 32,
                epochs: 2,
            },
            stage2: StageConfig {
                lr: 1e-4,
                momentum: 0.9,
                batch_size: 64,
                epochs: 5,
            },
            hidden: None,
            dropout: 0.0,
            seed: 1337,
            classes,
            limit_train: None,
            limit_test: None,
            validation_split: None,
        }
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
        Ok(())
    }
}
