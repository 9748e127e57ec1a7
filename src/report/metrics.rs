//! Accuracy, loss, the confusion matrix and per-class precision / recall /
//! F1 / support, printed in the layout of scikit-learn's
//! `classification_report`.

use crate::tensor::ops::argmax;
use crate::tensor::ops::cross_entropy_per_sample;
use ndarray::Array2;
use serde::Serialize;
use std::fmt::Write;

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ClassStats {
    pub name: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: usize,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Report {
    pub samples: usize,
    /// Fraction in [0, 1].
    pub accuracy: f64,
    /// Mean cross-entropy.
    pub loss: f64,
    /// Rows = true class, columns = predicted class.
    pub confusion_matrix: Vec<Vec<usize>>,
    pub per_class: Vec<ClassStats>,
    pub macro_avg: ClassStats,
    pub weighted_avg: ClassStats,
    /// Top-k accuracy, reported for 20 classes or more (k = 5).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<TopKAccuracy>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct TopKAccuracy {
    pub k: usize,
    /// Fraction of samples whose true class is among the k highest logits.
    pub accuracy: f64,
}

/// From this many classes on, reports carry top-5 accuracy and the text
/// report leaves the confusion matrix to the plot and the JSON.
pub const MANY_CLASSES: usize = 20;

/// Fraction of rows whose label is among the row's `k` largest logits
/// (ties broken toward the lower class index, like argmax).
pub fn top_k_accuracy(logits: &Array2<f32>, labels: &[u8], k: usize) -> f64 {
    let mut hits = 0usize;
    for (row, &t) in logits.rows().into_iter().zip(labels) {
        let v = row[t as usize];
        // Classes ranked above the true one: larger logit, or equal and earlier.
        let above = row
            .iter()
            .enumerate()
            .filter(|&(c, &x)| x > v || (x == v && c < t as usize))
            .count();
        if above < k {
            hits += 1;
        }
    }
    ratio(hits, labels.len())
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// Everything from the logits (N, classes) and the true labels.
pub fn report(logits: &Array2<f32>, labels: &[u8], names: &[String]) -> Report {
    let k = names.len();
    assert_eq!(logits.ncols(), k, "logits have {} classes, names {k}", logits.ncols());
    assert_eq!(logits.nrows(), labels.len(), "logits and labels differ in length");
    let mut cm = vec![vec![0usize; k]; k];
    for (row, &t) in logits.rows().into_iter().zip(labels) {
        cm[t as usize][argmax(row.as_slice().expect("rows of an owned array are contiguous"))] += 1;
    }
    let n = labels.len();
    let correct: usize = (0..k).map(|i| cm[i][i]).sum();
    let loss = cross_entropy_per_sample(logits.view(), labels)
        .iter()
        .map(|&l| l as f64)
        .sum::<f64>()
        / n.max(1) as f64;
    let per_class: Vec<ClassStats> = (0..k)
        .map(|c| {
            let tp = cm[c][c];
            let predicted: usize = (0..k).map(|r| cm[r][c]).sum();
            let support: usize = cm[c].iter().sum();
            let (p, r) = (ratio(tp, predicted), ratio(tp, support));
            let f1 = if p + r > 0.0 { 2.0 * p * r / (p + r) } else { 0.0 };
            ClassStats {
                name: names[c].clone(),
                precision: p,
                recall: r,
                f1,
                support,
            }
        })
        .collect();
    let avg = |name: &str, weight: &dyn Fn(&ClassStats) -> f64| {
        let wsum: f64 = per_class.iter().map(weight).sum();
        let m = |f: &dyn Fn(&ClassStats) -> f64| {
            if wsum > 0.0 {
                per_class.iter().map(|c| f(c) * weight(c)).sum::<f64>() / wsum
            } else {
                0.0
            }
        };
        ClassStats {
            name: name.into(),
            precision: m(&|c| c.precision),
            recall: m(&|c| c.recall),
            f1: m(&|c| c.f1),
            support: n,
        }
    };
    let macro_avg = avg("macro avg", &|_| 1.0);
    let weighted_avg = avg("weighted avg", &|c| c.support as f64);
    let top_k = (k >= MANY_CLASSES).then(|| TopKAccuracy {
        k: 5,
        accuracy: top_k_accuracy(logits, labels, 5),
    });
    Report {
        samples: n,
        accuracy: ratio(correct, n),
        loss,
        confusion_matrix: cm,
        per_class,
        macro_avg,
        weighted_avg,
        top_k,
    }
}

impl Report {
    /// scikit-learn's classification_report layout, then the confusion
    /// matrix with class names.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let w = self
            .per_class
            .iter()
            .map(|c| c.name.len())
            .max()
            .unwrap_or(0)
            .max("weighted avg".len());
        let top = match &self.top_k {
            Some(t) => format!("  top-{} accuracy: {:.4}", t.k, t.accuracy),
            None => String::new(),
        };
        let _ = writeln!(
            s,
            "accuracy: {:.4}{top}  loss: {:.4}  ({} samples)\n",
            self.accuracy, self.loss, self.samples
        );
        let _ = writeln!(
            s,
            "{:>w$} {:>9} {:>9} {:>9} {:>9}\n",
            "", "precision", "recall", "f1-score", "support"
        );
        for c in &self.per_class {
            let _ = writeln!(
                s,
                "{:>w$} {:>9.2} {:>9.2} {:>9.2} {:>9}",
                c.name, c.precision, c.recall, c.f1, c.support
            );
        }
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{:>w$} {:>9} {:>9} {:>9.2} {:>9}",
            "accuracy", "", "", self.accuracy, self.samples
        );
        for c in [&self.macro_avg, &self.weighted_avg] {
            let _ = writeln!(
                s,
                "{:>w$} {:>9.2} {:>9.2} {:>9.2} {:>9}",
                c.name, c.precision, c.recall, c.f1, c.support
            );
        }
        if self.per_class.len() >= MANY_CLASSES {
            let _ = writeln!(
                s,
                "\nconfusion matrix: {} x {} (in the JSON report and the plot)",
                self.per_class.len(),
                self.per_class.len()
            );
            return s;
        }
        let _ = writeln!(s, "\nconfusion matrix (rows: true class, columns: predicted)");
        let cw = self
            .per_class
            .iter()
            .map(|c| c.name.len().min(6))
            .max()
            .unwrap_or(4)
            .max(5);
        let _ = write!(s, "{:>w$}", "");
        for c in &self.per_class {
            let short: String = c.name.chars().take(cw).collect();
            let _ = write!(s, " {short:>cw$}");
        }
        let _ = writeln!(s);
        for (c, row) in self.per_class.iter().zip(&self.confusion_matrix) {
            let _ = write!(s, "{:>w$}", c.name);
            for v in row {
                let _ = write!(s, " {v:>cw$}");
            }
            let _ = writeln!(s);
        }
        s
    }
}

/// Mean cross-entropy and accuracy of `logits` (one row per record of
/// `idx`) against `labels[idx]`.
pub fn loss_acc(logits: &Array2<f32>, labels: &[u8], idx: &[usize]) -> (f64, f64) {
    let y: Vec<u8> = idx.iter().map(|&i| labels[i]).collect();
    let losses = cross_entropy_per_sample(logits.view(), &y);
    let correct = logits
        .rows()
        .into_iter()
        .zip(&y)
        .filter(|(r, &t)| argmax(r.as_slice().expect("row")) == t as usize)
        .count();
    let n = idx.len().max(1) as f64;
    (losses.iter().map(|&l| l as f64).sum::<f64>() / n, correct as f64 / n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_hand() {
        // 3 classes; true labels 0,0,1,2; predictions 0,1,1,1.
        let logits = ndarray::arr2(&[[5.0f32, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 5.0, 0.0], [0.0, 5.0, 0.0]]);
        let names: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let r = report(&logits, &[0, 0, 1, 2], &names);
        assert_eq!(r.confusion_matrix, vec![vec![1, 1, 0], vec![0, 1, 0], vec![0, 1, 0]]);
        assert_eq!(r.accuracy, 0.5);
        assert_eq!(r.per_class[0].precision, 1.0);
        assert_eq!(r.per_class[0].recall, 0.5);
        assert!((r.per_class[1].precision - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(r.per_class[2].f1, 0.0);
        assert_eq!(r.per_class[0].support, 2);
        assert!((r.macro_avg.recall - (0.5 + 1.0 + 0.0) / 3.0).abs() < 1e-12);
        assert!(r.text().contains("precision    recall  f1-score   support"));
    }
}
