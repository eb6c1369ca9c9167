//! Ablation behind docs/MOBILE.md: how much a calibrated EfficientNet-Lite0 (or any FP
//! checkpoint with linear bottlenecks) loses when the convs after a linear bottleneck get the
//! reference's half-wave (unsigned) activation quantizer instead of gmpq's signed one.
//!
//! cargo run --release --example signed_ablation -- CHECKPOINT DATA BITS [per-channel]
//! e.g. … -- lite0.safetensors imagenet-folder:../shared/datasets/samples/imagenet 8

use anyhow::{bail, Context, Result};
use gmpq::data::{stratified_subset, DataLoader, LoaderConfig, Split, SubsetSpec};
use gmpq::model::{ConvLayer, ConvSpec, LayerFactory, Model, ModelError};
use gmpq::policy::Policy;
use gmpq::quant::{self, CalibrationMethod, FixedPolicyConvs, Network, Precision};
use std::sync::Arc;
use tch::nn;

/// Builds every conv as `inner` would, but with a half-wave quantizer on every input.
struct AllUnsigned<'a>(&'a FixedPolicyConvs);

impl LayerFactory for AllUnsigned<'_> {
    fn conv(&self, path: nn::Path, spec: &ConvSpec) -> Result<Box<dyn ConvLayer>, ModelError> {
        let mut spec = spec.clone();
        spec.signed_input = false;
        self.0.conv(path, &spec)
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [ckpt, data, bits, rest @ ..] = args.as_slice() else {
        bail!("usage: signed_ablation CHECKPOINT DATA BITS [per-channel]");
    };
    let bits: u32 = bits.parse().context("BITS")?;
    let per_channel = rest.first().is_some_and(|s| s == "per-channel");
    let device = tch::Device::Cpu;
    let (fp_ck, fp) = quant::load(std::path::Path::new(ckpt), device)?;
    let cfg = fp_ck.meta.model.clone();
    let policy = Policy::uniform(&cfg, fp.net.convs(), bits, bits);
    let spec: gmpq::DatasetSpec = data.parse()?;
    let source = spec.load(Split::Test)?;
    let idx = stratified_subset(
        source.as_ref(),
        &SubsetSpec::limited(Some(source.len().min(1024)), 0),
    )?;
    let pipe = fp_ck.meta.eval_pipeline.clone();
    let batches: Vec<tch::Tensor> = DataLoader::new(
        source.clone(),
        &idx,
        Arc::new(pipe.clone()),
        LoaderConfig {
            batch_size: 64,
            ..Default::default()
        },
        0,
    )?
    .map(|b| b.map(|b| b.images))
    .collect::<std::result::Result<_, _>>()?;
    let (_, fp_pred) =
        gmpq::train::evaluate_with_predictions(&fp.net, source.clone(), &idx, &pipe, 64, device)?;
    for unsigned in [false, true] {
        let vs = nn::VarStore::new(device);
        let factory = FixedPolicyConvs::new(policy.bits_by_layer(), per_channel);
        let net = if unsigned {
            Model::new(&vs.root(), &cfg, &AllUnsigned(&factory))?
        } else {
            Model::new(&vs.root(), &cfg, &factory)?
        };
        let q = Network {
            vs,
            net,
            handles: factory.handles(),
            precision: Precision::Fixed {
                policy: policy.clone(),
                per_channel,
                numerics: gmpq::quant::Numerics::FakeQuant,
            },
            temperature: Default::default(),
            integer: None,
            layer_vars: Default::default(),
        };
        q.load_fp_weights(&fp_ck, std::path::Path::new(ckpt))?;
        quant::calibrate(&q, &batches, CalibrationMethod::KlBelow5Bits)?;
        let (_, pred) = gmpq::train::evaluate_with_predictions(
            &q.net,
            source.clone(),
            &idx,
            &pipe,
            64,
            device,
        )?;
        let agree = pred.iter().zip(&fp_pred).filter(|(a, b)| a == b).count();
        let correct = pred
            .iter()
            .zip(&idx)
            .filter(|(p, &i)| **p == source.label(i))
            .count();
        println!(
            "W{bits}A{bits}{}, {} quantizer after linear bottlenecks: top-1 {correct}/{n}, agreement with FP {agree}/{n}",
            if per_channel { " per-channel" } else { "" },
            if unsigned { "half-wave (reference)" } else { "signed (gmpq)" },
            n = idx.len()
        );
    }
    Ok(())
}
