//! The search itself: the teacher read once, a supernet per budget trained phase by phase on
//! the proxy (warm-up, then α and weights together), each epoch's log and snapshot, and the
//! policy extracted under its budget.

use super::step::{self, attribution_maps};
use super::{check_feasible, fixed_from_supernet, preferences, state, warn_if_slack, Quiet};
use super::{
    AlphaOpt, BudgetMode, ComplexityTerm, DualWeight, EpochLog, Geometry, Result, SearchConfig,
    SearchError, SearchJob, SearchProgress, SearchResult, SearchStep, Target,
};
use crate::attribution;
use crate::checkpoint::{self, Checkpoint};
use crate::data::{DataLoader, LoaderConfig, Pipeline, Shard};
use crate::quant::{self, Network, Precision};
use crate::train::{evaluate, pipelines, Sgd};
use std::sync::Arc;
use std::time::Instant;
use tch::Tensor;

struct Teacher {
    network: Network,
    pipeline: Pipeline,
}

/// Reads the teacher checkpoint once: its tensors seed the supernets, its network attributes.
fn load_teacher(job: &SearchJob) -> Result<(Checkpoint, Teacher)> {
    let (ck, network) = quant::load(&job.teacher, job.device)?;
    if network.precision != Precision::Full {
        return Err(SearchError::Invalid(format!(
            "{}: the teacher must be a full-precision checkpoint",
            job.teacher.display()
        )));
    }
    network.use_channels_last_weights();
    let pipeline = ck.meta.eval_pipeline.clone();
    Ok((ck, Teacher { network, pipeline }))
}

/// A supernet initialised from the teacher's weights (same layer names).
fn supernet_from(teacher_ck: &Checkpoint, job: &SearchJob) -> Result<Network> {
    let sn = quant::build(
        &teacher_ck.meta.model,
        Precision::Supernet {
            candidates: job.config.candidates.clone(),
        },
        job.device,
    )?;
    sn.load_fp_weights(teacher_ck, &job.teacher)?;
    Ok(sn)
}

/// What a phase produced; `resumed_seconds` is the wall time spent before an interruption.
struct PhaseRun {
    logs: Vec<EpochLog>,
    images: usize,
    resumed_seconds: f64,
}

struct Phase<'a> {
    name: String,
    target: Option<Target>,
    epochs: std::ops::Range<usize>,
    lambda: DualWeight,
    complexity: bool,
    geometry: &'a Geometry,
}

impl Phase<'_> {
    /// This phase's complexity term at the current λ.
    fn term(&self, cfg: &SearchConfig) -> ComplexityTerm<'_> {
        match (self.complexity, self.target, cfg.budget_mode) {
            (false, _, _) => ComplexityTerm::Off,
            (true, Some(target), BudgetMode::Penalty) => ComplexityTerm::Penalty {
                weight: cfg.budget_penalty,
                geometry: self.geometry,
                target,
            },
            (true, _, _) => ComplexityTerm::Weighted(self.lambda.lambda),
        }
    }
}

/// Runs the search for every target. A Pareto run (several targets) shares
/// `warmup_epochs` of supernet training without the complexity term.
pub fn search(job: SearchJob) -> Result<Vec<SearchResult>> {
    let cfg = job.config.clone();
    let shard = check_run(&job, &cfg)?;
    tch::manual_seed(cfg.seed as i64);
    let started = Instant::now();
    let (teacher_ck, teacher) = load_teacher(&job)?;
    // The teacher has the supernet's layers: its geometry measures every budget. An
    // unreachable budget fails here, before any training.
    let geometry = Geometry::new(teacher.network.net.convs(), teacher.network.net.fc_spec());
    for t in &job.targets {
        check_feasible(&geometry, t, &cfg.candidates)?;
        warn_if_slack(&geometry, t, &cfg.candidates);
    }
    let (train_pipe, teacher_val) = proxy_pipeline(&job, &cfg, &teacher_ck, &teacher)?;
    let probe = probe_batch(&job, &teacher.pipeline)?;

    let mut base = Some(supernet_from(&teacher_ck, &job)?);
    let ctx = Ctx {
        job: &job,
        cfg: &cfg,
        teacher: &teacher,
        train_pipe: Arc::new(train_pipe),
        probe,
        shard,
    };
    let warm = if job.targets.len() > 1 && cfg.warmup_epochs > 0 {
        let sn = base
            .as_ref()
            .ok_or_else(|| SearchError::Invalid("no supernet".into()))?;
        Some(ctx.warm_up(sn, &geometry)?)
    } else {
        None
    };
    let warm_secs =
        started.elapsed().as_secs_f64() + warm.as_ref().map_or(0.0, |w| w.resumed_seconds);
    let targets: Vec<Option<Target>> = if job.targets.is_empty() {
        vec![None]
    } else {
        job.targets.iter().copied().map(Some).collect()
    };
    let mut results = Vec::new();
    for target in targets {
        let t0 = Instant::now();
        let sn = match (&warm, base.take()) {
            (Some(w), _) => {
                let sn = supernet_from(&teacher_ck, &job)?;
                tch::no_grad(|| {
                    for (name, var) in sn.vs.variables() {
                        var.shallow_clone()
                            .copy_(&w.state[&name].to_device(job.device));
                    }
                });
                sn
            }
            // The first target of a run without warm-up trains the base supernet itself.
            (None, Some(b)) => b,
            (None, None) => supernet_from(&teacher_ck, &job)?,
        };
        let mut result = ctx.search_target(&sn, target, warm.as_ref(), &geometry)?;
        result.teacher_val_top1 = teacher_val;
        result.seconds += t0.elapsed().as_secs_f64() + warm_secs;
        results.push(result);
    }
    Ok(results)
}

/// Refuses a run the proxy set cannot feed; this rank's share of every batch.
fn check_run(job: &SearchJob, cfg: &SearchConfig) -> Result<Shard> {
    crate::train::check_run_size(
        cfg.epochs,
        cfg.batch_size,
        job.train_indices.len(),
        "proxy set",
    )
    .map_err(SearchError::Invalid)?;
    if cfg.warmup_epochs >= cfg.epochs && job.targets.len() > 1 {
        return Err(SearchError::Invalid(
            "warm-up must be shorter than the search".into(),
        ));
    }
    // Data-parallel: each rank trains on its share of every batch.
    crate::dist::shard(cfg.batch_size).map_err(SearchError::Invalid)
}

/// The proxy's training pipeline, after checking that the teacher fits the proxy images;
/// the teacher's held-out proxy top-1 (a warning when near chance).
fn proxy_pipeline(
    job: &SearchJob,
    cfg: &SearchConfig,
    teacher_ck: &Checkpoint,
    teacher: &Teacher,
) -> Result<(Pipeline, f64)> {
    let model = &teacher_ck.meta.model;
    if let Some(problem) =
        crate::train::input_mismatch(job.proxy.as_ref(), &teacher.pipeline, model)
    {
        return Err(SearchError::Invalid(format!(
            "the proxy data {problem}: the teacher does not fit it"
        )));
    }
    let native =
        job.proxy
            .native_shape()
            .unwrap_or([model.in_channels, model.input_size, model.input_size]);
    let (train_pipe, _) = pipelines(
        native,
        model,
        cfg.augment,
        teacher.pipeline.normalize.clone(),
    );
    let teacher_val = evaluate(
        &teacher.network.net,
        job.proxy.clone(),
        &job.val_indices,
        &teacher.pipeline,
        256,
        job.device,
    )?;
    // A teacher near chance on the proxy guides the search towards nothing.
    let chance = 100.0 / model.num_classes.max(1) as f64;
    if !job.val_indices.is_empty() && teacher_val.top1 < 2.0 * chance {
        tracing::warn!(
            "the teacher {} scores {:.2}% on held-out proxy images (chance {chance:.2}%): \
             its attribution guides the search towards nothing; train it longer first",
            job.teacher.display(),
            teacher_val.top1
        );
    }
    step::warn_if_point_map(&teacher.network.net, model, cfg, job.device);
    Ok((train_pipe, teacher_val.top1))
}

/// The progress to report to: rank 0 reports, the other ranks stay quiet.
fn main_progress(progress: &dyn SearchProgress) -> &dyn SearchProgress {
    if crate::dist::is_main() {
        progress
    } else {
        &Quiet
    }
}

/// The epoch's mean losses over all ranks' shares; batch norm as their mean.
fn mean_over_ranks(g: &crate::dist::Group, sums: [f64; 3], sn: &Network) -> Result<[f64; 3]> {
    let all = g.sum_f64(&sums)?;
    let w = g.world as f64;
    g.average_running_stats(&sn.vs)?;
    Ok([all[0] / w, all[1] / w, all[2] / w])
}

/// The shared warm-up of a several-budget run: its log, images and the weights every
/// budget's search starts from.
struct WarmUp {
    state: std::collections::BTreeMap<String, Tensor>,
    logs: Vec<EpochLog>,
    images: usize,
    resumed_seconds: f64,
}

struct Ctx<'a> {
    job: &'a SearchJob<'a>,
    cfg: &'a SearchConfig,
    teacher: &'a Teacher,
    train_pipe: Arc<Pipeline>,
    probe: Tensor,
    /// This rank's share of every batch (all of it for a lone process).
    shard: Shard,
}

fn probe_batch(job: &SearchJob, pipeline: &Pipeline) -> Result<Tensor> {
    let n = job.val_indices.len().min(64);
    let mut loader = DataLoader::new(
        job.proxy.clone(),
        &job.val_indices[..n],
        Arc::new(pipeline.clone()),
        LoaderConfig {
            batch_size: n.max(1),
            ..Default::default()
        },
        0,
    )?;
    match loader.next() {
        Some(b) => Ok(b?.images.to_device(job.device)),
        None => Err(SearchError::Invalid(
            "the proxy validation set is empty".into(),
        )),
    }
}

impl Ctx<'_> {
    /// Weights only, no complexity term, over the warm-up epochs.
    fn warm_up(&self, sn: &Network, geometry: &Geometry) -> Result<WarmUp> {
        let phase = Phase {
            name: "warm-up".into(),
            target: None,
            epochs: 0..self.cfg.warmup_epochs,
            lambda: DualWeight {
                lambda: 0.0,
                rate: 0.0,
                mode: self.cfg.budget_mode,
                scale: 0.0,
            },
            complexity: false,
            geometry,
        };
        let run = self.run(sn, phase)?;
        Ok(WarmUp {
            state: checkpoint::var_store_tensors(&sn.vs),
            logs: run.logs,
            images: run.images,
            resumed_seconds: run.resumed_seconds,
        })
    }

    /// One budget's search on `sn` (after the warm-up, if any) and the policy it gives.
    /// `seconds` counts this phase only and `teacher_val_top1` is left 0: the caller adds
    /// the shared parts.
    fn search_target(
        &self,
        sn: &Network,
        target: Option<Target>,
        warm: Option<&WarmUp>,
        geometry: &Geometry,
    ) -> Result<SearchResult> {
        let cfg = self.cfg;
        let phase = Phase {
            name: target.map_or("search".to_string(), |t| format!("search {t}")),
            target,
            epochs: warm.map_or(0, |_| cfg.warmup_epochs)..cfg.epochs,
            lambda: DualWeight {
                // The log's λ column shows μ under the penalty (it stays fixed).
                lambda: match (cfg.budget_mode, target) {
                    (BudgetMode::Penalty, Some(_)) => cfg.budget_penalty,
                    _ => cfg.complexity_weight,
                },
                rate: if target.is_some() { cfg.dual_rate } else { 0.0 },
                mode: cfg.budget_mode,
                scale: cfg.complexity_weight,
            },
            complexity: true,
            geometry,
        };
        let PhaseRun {
            logs: mut log,
            images,
            resumed_seconds,
        } = self.run(sn, phase)?;
        let argmax = sn.argmax_policy()?;
        let alpha = preferences(sn);
        let policy = cfg
            .extraction
            .strategy()
            .extract(&argmax, geometry, target.as_ref(), &alpha)?
            .with_totals(sn.net.convs(), sn.net.fc_spec());
        let mut full_log = warm.map_or_else(Vec::new, |w| w.logs.clone());
        full_log.append(&mut log);
        let probe = self.probe.narrow(0, 0, self.probe.size()[0].min(6));
        let (a_t, a_s, _) = tch::no_grad(|| self.maps(sn, &probe, false));
        Ok(SearchResult {
            target,
            policy,
            argmax,
            alpha,
            log: full_log,
            teacher_val_top1: 0.0,
            seconds: resumed_seconds,
            images: images + warm.map_or(0, |w| w.images),
            heatmaps: [probe, a_t, a_s],
        })
    }

    /// Re-estimates a fixed network's batch-norm statistics on training batches: the
    /// supernet's statistics describe its softmax-mixed inputs, not one branch's, and make
    /// the argmax network look far worse than it is.
    fn recalibrate_batch_norm(&self, fixed: &Network, epoch: usize) -> Result<()> {
        // Momentum 0.1: after 30 batches the supernet's statistics weigh 0.9^30 ≈ 4%.
        const BATCHES: usize = 30;
        let job = self.job;
        let mut done = 0;
        let mut round = 0u64;
        while done < BATCHES {
            let loader = DataLoader::new(
                job.proxy.clone(),
                &job.train_indices,
                self.train_pipe.clone(),
                LoaderConfig::training(self.cfg.batch_size, self.cfg.seed ^ 0xB4)
                    .sharded(self.shard),
                (epoch as u64) << 8 | round,
            )?;
            let before = done;
            tch::no_grad(|| -> Result<()> {
                for batch in loader.take(BATCHES - done) {
                    let x = batch?.images.to_device(job.device);
                    let _ = tch::nn::ModuleT::forward_t(&fixed.net, &x, true);
                    done += 1;
                }
                Ok(())
            })?;
            if done == before {
                break;
            }
            round += 1;
        }
        Ok(())
    }

    /// Teacher and student attribution maps of `x` (student with gradient).
    fn maps(&self, sn: &Network, x: &Tensor, train: bool) -> (Tensor, Tensor, Tensor) {
        attribution_maps(
            &self.teacher.network.net,
            sn,
            self.cfg.attribution,
            x,
            train,
        )
    }

    /// The end of an epoch: the argmax policy's network, batch norm recalibrated, scored on
    /// the held-out proxy images, and the attribution rank correlation on the probe. The
    /// training sums are the caller's to fill in.
    fn epoch_log(
        &self,
        sn: &Network,
        epoch: usize,
        group: Option<&crate::dist::Group>,
    ) -> Result<EpochLog> {
        let argmax = sn.argmax_policy()?;
        let fixed = fixed_from_supernet(sn, &argmax)?;
        self.recalibrate_batch_norm(&fixed, epoch)?;
        if let Some(g) = group {
            g.average_running_stats(&fixed.vs)?;
        }
        let val = crate::train::evaluate_shared(
            &fixed.net,
            self.job.proxy.clone(),
            &self.job.val_indices,
            &self.teacher.pipeline,
            self.job.device,
            group,
        )?;
        let (a_t, a_s, _) = tch::no_grad(|| self.maps(sn, &self.probe, false));
        Ok(EpochLog {
            target: None,
            epoch: epoch + 1,
            ce: 0.0,
            attribution_loss: 0.0,
            complexity_loss: 0.0,
            p: 0.0,
            lambda: 0.0,
            expected_bops: 0.0,
            argmax_bops: argmax.totals.as_ref().map_or(0.0, |t| t.bops as f64),
            argmax_proxy_top1: val.top1,
            rank_correlation: attribution::spearman(&a_t, &a_s),
            seconds: 0.0,
            images: 0,
        })
    }

    /// The phase's saved state, if one fits: the first epoch to run, the log so far, the
    /// images seen and the seconds spent (λ and the optimizers restored in place).
    fn resume(
        &self,
        path: &std::path::Path,
        sn: &Network,
        phase: &mut Phase,
        w_opt: &mut Sgd,
        a_opt: &mut AlphaOpt,
    ) -> Result<(usize, Vec<EpochLog>, usize, f64)> {
        let Some(st) = state::load(path, self.cfg, &phase.name, &sn.vs, w_opt, a_opt)? else {
            return Ok((phase.epochs.start, Vec::new(), 0, 0.0));
        };
        tracing::info!(
            "{}: resuming after epoch {} ({})",
            phase.name,
            st.epochs_done,
            path.display()
        );
        phase.lambda.lambda = st.lambda;
        let first = st.epochs_done.clamp(phase.epochs.start, phase.epochs.end);
        Ok((first, st.logs, st.images, st.seconds))
    }

    fn run(&self, sn: &Network, mut phase: Phase) -> Result<PhaseRun> {
        let cfg = self.cfg;
        let job = self.job;
        let mut w_opt = Sgd::new(sn.weight_parameters(), cfg.momentum, cfg.weight_decay);
        let mut a_opt = AlphaOpt::new(cfg, sn.alpha_parameters());
        let snapshot = job.state_dir.as_ref().map(|d| state::path(d, &phase.name));
        let (first, mut logs, mut images, resumed_seconds) = match &snapshot {
            Some(path) => self.resume(path, sn, &mut phase, &mut w_opt, &mut a_opt)?,
            None => (phase.epochs.start, Vec::new(), 0, 0.0),
        };
        let phase_started = Instant::now();
        let vars = sn.vs.variables();
        let macs: Vec<f64> = sn.handles.iter().map(|h| h.spec.macs() as f64).collect();
        let steps = job.train_indices.len() / cfg.batch_size;
        // Data-parallel: rank 0's supernet for all; each rank its share of every batch; rank 0
        // reports and saves.
        let group = crate::dist::current();
        let shard = self.shard;
        if let Some(g) = group {
            g.broadcast_var_store(&sn.vs)?;
        }
        let progress = main_progress(job.progress);
        progress.phase(&phase.name, phase.epochs.end - first, steps);
        for epoch in first..phase.epochs.end {
            let t0 = Instant::now();
            let decay = 0.1f64.powi((epoch / cfg.step_epochs.max(1)) as i32);
            sn.temperature.set(cfg.temperature.at(epoch, cfg.epochs));
            let alpha_moves = epoch >= cfg.alpha_frozen_epochs;
            let alpha_lr =
                alpha_moves.then_some(cfg.alpha_lr * if cfg.alpha_lr_decay { decay } else { 1.0 });
            let loader = DataLoader::new(
                job.proxy.clone(),
                &job.train_indices,
                self.train_pipe.clone(),
                LoaderConfig::training(cfg.batch_size, cfg.seed).sharded(shard),
                epoch as u64,
            )?;
            let (mut ce_sum, mut attr_sum, mut comp_sum, mut p_last, mut n) =
                (0.0, 0.0, 0.0, 0.0, 0);
            let mut expected = 0.0;
            for batch in loader {
                let batch = batch?;
                let x = batch.images.to_device(job.device);
                let y = batch.labels.to_device(job.device);
                let out = SearchStep {
                    supernet: sn,
                    teacher: &self.teacher.network.net,
                    config: cfg,
                    weight_opt: &mut w_opt,
                    alpha_opt: &mut a_opt,
                    macs: &macs,
                    vars: &vars,
                    group,
                }
                .run(
                    &x,
                    &y,
                    phase.term(cfg),
                    cfg.lr * decay,
                    alpha_lr,
                    epoch + 1,
                )?;
                let bits_f = out.expected_bits;
                expected = phase.geometry.bops(&bits_f);
                if let (Some(t), true, true) = (&phase.target, phase.complexity, alpha_moves) {
                    let m = phase.geometry.measure(t, &bits_f);
                    phase.lambda.update(m, phase.geometry.limit(t));
                }
                let (c, at) = (out.ce, out.attribution_loss);
                ce_sum += c;
                attr_sum += at;
                comp_sum += out.complexity_loss;
                p_last = out.p;
                n += 1;
                images += y.size()[0] as usize * shard.world;
                progress.step(c, at, expected);
            }
            if let Some(g) = group {
                [ce_sum, attr_sum, comp_sum] =
                    mean_over_ranks(g, [ce_sum, attr_sum, comp_sum], sn)?;
            }
            let n = n.max(1) as f64;
            let mut log = self.epoch_log(sn, epoch, group)?;
            log.target = phase.target.map(|t| t.to_string());
            (log.ce, log.attribution_loss, log.complexity_loss) =
                (ce_sum / n, attr_sum / n, comp_sum / n);
            (log.p, log.lambda, log.expected_bops) = (p_last, phase.lambda.lambda, expected);
            log.seconds = t0.elapsed().as_secs_f64();
            log.images = images;
            progress.epoch(&log);
            logs.push(log);
            if let Some(g) = group {
                g.check_same_var_store(
                    &sn.vs,
                    &format!("{} after epoch {}", phase.name, epoch + 1),
                )?;
            }
            if let (Some(path), true) = (&snapshot, crate::dist::is_main()) {
                let seconds = resumed_seconds + phase_started.elapsed().as_secs_f64();
                let st = state::PhaseState {
                    config: cfg.clone(),
                    phase: phase.name.clone(),
                    epochs_done: epoch + 1,
                    lambda: phase.lambda.lambda,
                    logs: logs.clone(),
                    images,
                    seconds,
                };
                state::save(path, &st, &sn.vs, &w_opt, &a_opt)?;
            }
        }
        Ok(PhaseRun {
            logs,
            images,
            resumed_seconds,
        })
    }
}
