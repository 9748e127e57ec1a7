//! Progress output: an indicatif bar on a terminal, plain log lines (about
//! every 25% or 10 s) when stderr is not one (CI logs, redirected runs),
//! and the observer that shows a library job's events with them.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};
use vgg16_cpu::report::history::{EpochRecord, StageResult};
use vgg16_cpu::Observer;

pub struct Progress {
    bar: Option<ProgressBar>,
    label: String,
    total: u64,
    done: u64,
    start: Instant,
    last_log: Instant,
    last_frac: f64,
    unit: &'static str,
}

impl Progress {
    /// `total` items of `unit` (e.g. "img").
    pub fn new(label: &str, total: u64, unit: &'static str) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} {unit} ({per_sec}, ETA {eta}) {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .with_key("unit", {
                    let u = unit.to_string();
                    move |_: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                        let _ = w.write_str(&u);
                    }
                }),
            );
            b.set_prefix(label.to_string());
            b
        });
        let now = Instant::now();
        Progress {
            bar,
            label: label.to_string(),
            total,
            done: 0,
            start: now,
            last_log: now,
            last_frac: 0.0,
            unit,
        }
    }

    /// `n` more items done; `msg` is shown beside the bar (e.g. the loss).
    pub fn inc(&mut self, n: u64, msg: &str) {
        self.done += n;
        if let Some(b) = &self.bar {
            b.set_message(msg.to_string());
            b.inc(n);
            return;
        }
        let frac = if self.total == 0 {
            1.0
        } else {
            self.done as f64 / self.total as f64
        };
        // Short jobs log nothing but their end (callers print a summary);
        // long ones every 25% and at least every 10 s.
        let long = self.start.elapsed() >= Duration::from_secs(2);
        if self.last_log.elapsed() >= Duration::from_secs(10)
            || (long && (frac - self.last_frac >= 0.25 || self.done == self.total))
        {
            self.last_frac = frac;
            self.last_log = Instant::now();
            let secs = self.start.elapsed().as_secs_f64();
            let rate = self.done as f64 / secs.max(1e-9);
            let eta = if rate > 0.0 {
                (self.total - self.done.min(self.total)) as f64 / rate
            } else {
                0.0
            };
            eprintln!(
                "{}: {}/{} {} ({:.1}%, {:.1} {}/s, ETA {:.0}s) {}",
                self.label,
                self.done,
                self.total,
                self.unit,
                100.0 * frac,
                rate,
                self.unit,
                eta,
                msg
            );
        }
    }

    /// A line above the bar (or a plain line without one).
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }

    pub fn finish(self) -> f64 {
        if let Some(b) = &self.bar {
            b.finish();
        }
        self.start.elapsed().as_secs_f64()
    }
}

/// The command line's [`Observer`]: a progress bar (or plain log lines) per
/// phase, status lines above it, one line per epoch and per stage.
#[derive(Default)]
pub struct CliObserver {
    bar: Option<Progress>,
}

impl Observer for CliObserver {
    fn info(&mut self, line: &str) {
        match &self.bar {
            Some(p) => p.println(line),
            None => eprintln!("{line}"),
        }
    }
    fn begin(&mut self, task: &str, total: u64, unit: &'static str) {
        if let Some(p) = self.bar.take() {
            p.finish();
        }
        self.bar = Some(Progress::new(task, total, unit));
    }
    fn advance(&mut self, n: u64, msg: &str) {
        if let Some(p) = &mut self.bar {
            p.inc(n, msg);
        }
    }
    fn end(&mut self) {
        if let Some(p) = self.bar.take() {
            p.finish();
        }
    }
    fn epoch(&mut self, r: &EpochRecord, epochs: usize) {
        self.info(&format!(
            "stage {} epoch {}/{epochs}: loss {:.4} acc {:.4} | val_loss {:.4} val_acc {:.4} | {:.1} s, {:.0} img/s",
            r.stage,
            r.epoch,
            r.train_loss,
            r.train_accuracy,
            r.val_loss,
            r.val_accuracy,
            r.seconds,
            r.images_per_second
        ));
    }
    fn stage_done(&mut self, r: &StageResult) {
        self.info(&format!(
            "stage {} done: test accuracy {:.4}, test loss {:.4}",
            r.stage, r.test_accuracy, r.test_loss
        ));
    }
}
