//! The stage comparison, the recipe's last step: Markdown and JSON.

use crate::report::history::StageResult;
use serde_json::json;

/// The stage comparison: Markdown table and JSON, as the recipe's last step.
pub fn comparison(
    cache_seconds: f64,
    cached: bool,
    stages: &[StageResult],
    total_seconds: f64,
) -> (String, serde_json::Value) {
    let mut md = String::from("| | test accuracy | test loss | epochs | wall time (s) | train images/s |\n| --- | --- | --- | --- | --- | --- |\n");
    md.push_str(&format!(
        "| {} | | | | {cache_seconds:.1} | |\n",
        if cached {
            "activation cache (blocks 1-4, once)"
        } else {
            "no cache (--no-cache)"
        }
    ));
    for r in stages {
        let name = if r.stage == 1 {
            "stage 1: feature extraction (head)"
        } else {
            "stage 2: fine-tuning (block5 + head)"
        };
        // A stage run for 0 epochs (e.g. `--stage2-epochs 0`) trained
        // nothing: no time or rate to show.
        let (secs, rate) = if r.epochs == 0 {
            ("-".to_string(), "-".to_string())
        } else {
            (format!("{:.1}", r.seconds), format!("{:.0}", r.images_per_second))
        };
        md.push_str(&format!(
            "| {name} | {:.4} | {:.4} | {} | {secs} | {rate} |\n",
            r.test_accuracy, r.test_loss, r.epochs
        ));
    }
    md.push_str(&format!("| total | | | | {total_seconds:.1} | |\n"));
    let js =
        json!({"cache_seconds": cache_seconds, "cached": cached, "stages": stages, "total_seconds": total_seconds});
    (md, js)
}
