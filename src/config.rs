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
        if self.image_size == 0 || !self.image_size.is_multiple_of(32) {
            crate::config_bail!(
                "--image-size {}: must be a positive multiple of 32 (VGG-16 halves it five times; 32 means no resize)",
                self.image_size
            );
        }
        for (name, v) in [
            ("--stage1-batch-size", self.stage1.batch_size),
            ("--stage2-batch-size", self.stage2.batch_size),
        ] {
            if v == 0 {
                crate::config_bail!("{name} must be at least 1");
            }
        }
        if !(0.0..1.0).contains(&self.dropout) {
            crate::config_bail!("--dropout must be in [0, 1)");
        }
        if let Some(f) = self.validation_split {
            if !(0.0..1.0).contains(&f) {
                crate::config_bail!("--validation-split must be in [0, 1)");
            }
        }
        Ok(())
    }
}
