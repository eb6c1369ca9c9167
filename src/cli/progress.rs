//! Progress bars for long work.

use gmpq::checkpoint::EpochMetrics;
use gmpq::train::Progress;
use indicatif::{ProgressBar, ProgressStyle};
use std::sync::Mutex;

pub struct TrainBars {
    bar: Mutex<Option<ProgressBar>>,
}

impl TrainBars {
    pub fn new() -> Self {
        Self {
            bar: Mutex::new(None),
        }
    }
}

impl Progress for TrainBars {
    fn epoch_start(&self, epoch: usize, epochs: usize, batches: usize) {
        let bar = ProgressBar::new(batches as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed} < {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(format!("epoch {epoch}/{epochs}"));
        if let Ok(mut b) = self.bar.lock() {
            *b = Some(bar);
        }
    }
    fn batch(&self, loss: f64, lr: f64, ips: f64) {
        if let Ok(b) = self.bar.lock() {
            if let Some(bar) = b.as_ref() {
                bar.set_message(format!("loss {loss:.4} lr {lr:.4} {ips:.0} img/s"));
                bar.inc(1);
            }
        }
    }
    fn evaluating(&self) {
        if let Ok(b) = self.bar.lock() {
            if let Some(bar) = b.as_ref() {
                bar.set_message("evaluating…");
            }
        }
    }
    fn epoch_end(&self, m: &EpochMetrics) {
        if let Ok(mut b) = self.bar.lock() {
            if let Some(bar) = b.take() {
                bar.finish_and_clear();
            }
        }
        let val = m
            .val_top1
            .map_or(String::new(), |v| format!(" | validation top-1 {v:.2}%"));
        tracing::info!(
            "epoch {:>3}: train loss {:.4} top-1 {:.2}% | test loss {:.4} top-1 {:.2}% top-5 {:.2}%{val} | {:.1}s, {:.0} img/s",
            m.epoch, m.train_loss, m.train_top1, m.test_loss, m.test_top1, m.test_top5, m.seconds, m.images_per_second
        );
    }
}
