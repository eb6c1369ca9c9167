//! The evidence behind the choice's noise band (docs/RESULTS.md, "Choosing within the
//! noise"): fine-tuned checkpoints evaluated on a run's held-out validation images, and the
//! share of images each pair of them disagrees on (right against wrong).
//!
//! cargo run --release --example validation_discordance -- DATA HOLDOUT ARM=CHECKPOINT...
//! e.g. … -- idx:../shared/datasets/fashion-mnist 5000 uniform=RUN/finetune-uniform/last.safetensors gmpq=…

use gmpq::pipeline::{Arm, ValidationPredictions};
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [data, holdout, checkpoints @ ..] = args.as_slice() else {
        anyhow::bail!("usage: DATA HOLDOUT ARM=CHECKPOINT...");
    };
    let holdout: usize = holdout.parse()?;
    let arms = checkpoints
        .iter()
        .map(|a| {
            let (arm, path) = a
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("{a}: expected ARM=CHECKPOINT"))?;
            let arm = arm.parse::<Arm>().map_err(anyhow::Error::msg)?;
            Ok((arm, PathBuf::from(path)))
        })
        .collect::<anyhow::Result<Vec<(Arm, PathBuf)>>>()?;
    let p = ValidationPredictions::evaluate(&arms, data, holdout, tch::Device::Cpu)?;
    for (i, (a, _)) in arms.iter().enumerate() {
        for (b, _) in &arms[i + 1..] {
            if let Some(q) = p.discordance(*a, *b) {
                println!("{} {} discordance {:.4}", a.name(), b.name(), q);
            }
        }
    }
    Ok(())
}
