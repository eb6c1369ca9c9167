//! The ranked extraction keeps the candidate that calibrates best on held-out proxy images.

mod common;

use common::{gmpq, stderr};
use gmpq::checkpoint::Checkpoint;
use gmpq::data::{ConcatDataset, DatasetSpec, ImageSource, Split, SubsetSpec};
use gmpq::policy::{Candidates, Policy};
use gmpq::quant::{self, Precision};
use gmpq::search::rank::{rank, RankingData};
use gmpq::search::{Geometry, PolicyMeta, Preferences, Target};
use std::collections::BTreeMap;
use std::sync::Arc;

#[test]
fn the_ranking_keeps_the_better_starting_point_and_extract_reruns_it() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let path = common::fmnist_teacher(&dir.path().join("teacher"), 1000);
    let ck = Checkpoint::load(&path).unwrap();
    let cfg = ck.meta.model.clone();
    let fp = quant::build(&cfg, Precision::Full, tch::Device::Cpu).unwrap();
    let geometry = Geometry::new(fp.net.convs(), fp.net.fc_spec());
    let cands = Candidates::new(&[2, 3, 4, 6], &[2, 3, 4, 6]).unwrap();
    let uniform = |w, a| {
        let mut p = Policy::uniform(&cfg, fp.net.convs(), w, a);
        p.candidates = cands.clone();
        p
    };
    // α that prefers the 2-bit policy: the ranking must still keep the one that starts better.
    let alpha: BTreeMap<String, Vec<f64>> = uniform(2, 2)
        .layers
        .iter()
        .map(|l| (l.name.clone(), vec![3.0, 0.0, 0.0, 0.0]))
        .collect();
    let prefs = Preferences {
        alpha_w: alpha.clone(),
        alpha_a: alpha,
        temperature: 1.0,
        bits: None,
    };
    let spec: DatasetSpec = "bundled:fashion-mnist".parse().unwrap();
    let train = spec.load(Split::Train).unwrap();
    let test = spec.load(Split::Test).unwrap();
    let offset = train.len();
    let calib: Vec<usize> = (0..256).map(|i| i * 20).collect();
    let val: Vec<usize> =
        gmpq::data::stratified_subset(test.as_ref(), &SubsetSpec::limited(Some(300), 0))
            .unwrap()
            .into_iter()
            .map(|i| i + offset)
            .collect();
    let proxy: Arc<dyn ImageSource> = Arc::new(ConcatDataset::new(train, test));
    let data = RankingData {
        teacher_path: &path,
        teacher: &ck,
        proxy,
        calib_indices: &calib,
        val_indices: &val,
        calibration: gmpq::train::CALIBRATION,
        device: tch::Device::Cpu,
    };
    let candidates = vec![
        ("w2a2".to_string(), uniform(2, 2)),
        ("w6a6".to_string(), uniform(6, 6)),
    ];
    let (kept, record) = rank(candidates, &prefs, &geometry, &data).unwrap();
    let scores: Vec<f64> = record.candidates.iter().map(|c| c.val_top1).collect();
    assert!(
        scores[1] > scores[0],
        "w6a6 should calibrate better: {scores:?}"
    );
    assert_eq!(record.chosen, 1);
    assert_eq!(kept.layers, uniform(6, 6).layers);
    assert!(record.candidates[0].alpha_log_prob > record.candidates[1].alpha_log_prob);

    // `gmpq extract --rank` on a saved search: every candidate recorded with its score, the
    // best kept, all within the budget.
    let mut searched = uniform(2, 2);
    searched.meta = Some(
        PolicyMeta {
            teacher: Some(path.clone()),
            model_config: Some(cfg.clone()),
            alpha: Some(prefs.clone()),
            ..PolicyMeta::new("gmpq", Some(Target::Compression(100.0)), Default::default())
        }
        .to_value(),
    );
    let searched_path = dir.path().join("policy.json");
    searched.save(&searched_path).unwrap();
    let out = dir.path().join("ranked.json");
    let o = gmpq()
        .args([
            "--threads",
            "1",
            "extract",
            searched_path.to_str().unwrap(),
            "--rank",
            "--data",
            "bundled:fashion-mnist",
            "--limit",
            "1000",
            "--val-limit",
            "200",
            "--out",
            out.to_str().unwrap(),
            "--json",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let ranked = &doc["ranking"]["candidates"];
    let n = ranked.as_array().unwrap().len();
    assert!(n >= 3, "α's best, alternatives and uniform: {doc}");
    let best = ranked
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["val_top1"].as_f64().unwrap())
        .fold(f64::MIN, f64::max);
    // The best is kept when it beats the search's own policy by more than the held-out
    // images resolve (`min_gain`), else the search's own (the first).
    let chosen = doc["ranking"]["chosen"].as_u64().unwrap() as usize;
    let own = ranked[0]["val_top1"].as_f64().unwrap();
    let min_gain = doc["ranking"]["min_gain"].as_f64().unwrap();
    if best - own > min_gain {
        assert_eq!(ranked[chosen]["val_top1"].as_f64().unwrap(), best, "{doc}");
    } else {
        assert_eq!(chosen, 0, "{doc}");
    }
    for c in ranked.as_array().unwrap() {
        assert!(
            c["compression"].as_f64().unwrap() >= 100.0 * (1.0 - 1e-9),
            "{c}"
        );
    }
    let written = Policy::load(&out).unwrap();
    let meta = PolicyMeta::of(&written).unwrap().unwrap();
    assert_eq!(meta.ranking.unwrap().chosen, chosen);
}
