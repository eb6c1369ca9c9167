//! Allocation methods: each rule that turns a budget into per-layer bits is one type behind
//! [`Allocator`] — [`Supernet`] (GMPQ; EdMIPS with attribution weight 0), [`Hawq`],
//! [`UniformFill`], [`Uniform`] and [`Random`] — made by one factory, [`Method::allocator`].
//! `gmpq search --method` and the pipeline's arms both state a [`Method`] and reach the rule
//! through that factory; what a method reads (nothing but the teacher's geometry, the proxy's
//! training images, or those plus held-out images) the caller loads once for all of them.

use super::budget::{random_policy, Geometry, Target};
use super::extract::check_feasible;
use super::hawq::{self, HawqConfig, Sensitivities, SensitivityRule};
use super::{fill, SearchConfig, SearchError, SearchJob, SearchProgress, SearchResult};
use crate::checkpoint::Checkpoint;
use crate::data::ImageSource;
use crate::policy::{Candidates, Policy};
use crate::quant::{self, Precision};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

type Result<T> = std::result::Result<T, SearchError>;

/// How far a random policy's cost may fall short of the budget (2 %).
pub const RANDOM_TOLERANCE: f64 = 0.02;
/// Draws before a random policy is walked to the budget ([`random_policy`]).
const RANDOM_DRAWS: usize = 1_000_000;

/// A method with its own settings: the typed value a search request records (its identity
/// for resume). The supernet's settings are the request's [`SearchConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// The differentiable supernet search (GMPQ; EdMIPS with attribution weight 0).
    Supernet,
    /// The teacher's Hessian-trace and activation sensitivities under the knapsack.
    Hawq { images: usize, samples: usize },
    /// The best uniform policy, the rest of the budget spent by the same sensitivities.
    UniformFill { images: usize, samples: usize },
    /// The uniform policy with the most BOPs within the budget (no data needed).
    Uniform,
    /// Per-layer bits drawn with the seed, rejection-sampled until the cost lies within 2 %
    /// under the budget (no data needed).
    Random,
}

/// The names `gmpq search --method` takes, each with what it is.
pub const METHOD_NAMES: [(&str, &str); 6] = [
    (
        "gmpq",
        "the supernet search with attribution rank preservation",
    ),
    (
        "edmips",
        "the supernet search without the attribution term (attribution weight 0)",
    ),
    (
        "hawq",
        "Hessian-trace and activation sensitivities minimised under the budget",
    ),
    (
        "uniform-fill",
        "the best uniform policy, the rest of the budget spent by HAWQ's sensitivities",
    ),
    (
        "uniform",
        "the uniform policy with the most BOPs within the budget (no data)",
    ),
    (
        "random",
        "per-layer bits drawn with the seed, within 2 % under the budget (no data)",
    ),
];

impl Method {
    /// The method `name` (one of [`METHOD_NAMES`]) states, with the sensitivity analysis's
    /// images and probes for those that use one; `Ok((method, attribution weight override))`:
    /// `edmips` is the supernet with attribution weight 0.
    pub fn from_name(name: &str, images: usize, samples: usize) -> Result<(Self, Option<f64>)> {
        Ok(match name {
            "gmpq" => (Method::Supernet, None),
            "edmips" => (Method::Supernet, Some(0.0)),
            "hawq" => (Method::Hawq { images, samples }, None),
            "uniform-fill" => (Method::UniformFill { images, samples }, None),
            "uniform" => (Method::Uniform, None),
            "random" => (Method::Random, None),
            other => {
                let names: Vec<&str> = METHOD_NAMES.iter().map(|(n, _)| *n).collect();
                return Err(SearchError::Invalid(format!(
                    "unknown method '{other}' ({})",
                    names.join(", ")
                )));
            }
        })
    }

    /// The one factory: the allocator that runs this method with `config`'s settings (the
    /// supernet's recipe, the candidates, the seed).
    pub fn allocator(self, config: &SearchConfig) -> Box<dyn Allocator> {
        let candidates = config.candidates.clone();
        match self {
            Method::Supernet => Box::new(Supernet {
                config: config.clone(),
            }),
            Method::Hawq { images, samples } => Box::new(Hawq(Sensitivity {
                candidates,
                images,
                samples,
            })),
            Method::UniformFill { images, samples } => Box::new(UniformFill(Sensitivity {
                candidates,
                images,
                samples,
            })),
            Method::Uniform => Box::new(Uniform { candidates }),
            Method::Random => Box::new(Random {
                candidates,
                seed: config.seed,
            }),
        }
    }

    /// The name `meta.method` records (`attribution_weight` tells GMPQ from EdMIPS).
    pub fn name(self, attribution_weight: f64) -> &'static str {
        match self {
            Method::Supernet if attribution_weight == 0.0 => "edmips",
            Method::Supernet => "gmpq",
            Method::Hawq { .. } => "hawq",
            Method::UniformFill { .. } => "uniform-fill",
            Method::Uniform => "uniform",
            Method::Random => "random",
        }
    }
}

/// What a method reads besides the teacher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reads {
    /// The teacher's geometry alone.
    Geometry,
    /// Up to this many of the proxy's training images (the sensitivity analyses).
    ProxyTrain { images: usize },
    /// The proxy's training images and held-out images (the supernet search).
    ProxyWithHeldOut,
}

/// The proxy images a method reads: indices into one source.
pub struct ProxyData {
    pub source: Arc<dyn ImageSource>,
    pub train_indices: Vec<usize>,
    /// Held-out images (empty unless the method [`Reads::ProxyWithHeldOut`]).
    pub val_indices: Vec<usize>,
}

/// What an allocation runs on.
pub struct AllocationInput<'a> {
    pub teacher: &'a Path,
    /// One budget, several (a Pareto run), or none (only the supernet runs without one).
    pub targets: &'a [Target],
    /// `None` exactly when the method reads [`Reads::Geometry`].
    pub proxy: Option<ProxyData>,
    /// Sensitivities an identical analysis measured before (used as they are).
    pub sensitivities: Option<Sensitivities>,
    pub device: tch::Device,
    pub progress: &'a dyn SearchProgress,
    /// Where the supernet snapshots itself every epoch and resumes from.
    pub state_dir: Option<PathBuf>,
}

/// What a method found for one budget, with what it measured on the way.
pub struct Allocation {
    pub target: Option<Target>,
    /// The policy, with totals.
    pub policy: Policy,
    pub seconds: f64,
    pub images: usize,
    pub evidence: Evidence,
}

/// The method's record behind a policy.
pub enum Evidence {
    /// Uniform or random: the geometry alone (random: the seed it drew with).
    Geometry { seed: Option<u64> },
    /// HAWQ or uniform-fill: the sensitivity analysis and its settings.
    Sensitivities {
        settings: HawqConfig,
        sensitivities: Sensitivities,
    },
    /// The supernet search's result (α, epoch log, attribution maps).
    Supernet(Box<SearchResult>),
}

/// One bit-allocation rule.
pub trait Allocator {
    /// The name `meta.method` records.
    fn name(&self) -> &'static str;
    /// Its name in charts and tables.
    fn label(&self) -> &'static str;
    /// What the caller loads for [`Self::allocate`].
    fn reads(&self) -> Reads;
    /// Whether it runs data-parallel across the process group (else as one process).
    fn data_parallel(&self) -> bool {
        false
    }
    /// One policy per budget of `input.targets`.
    fn allocate(&self, input: AllocationInput<'_>) -> Result<Vec<Allocation>>;
}

/// The supernet search of [`super::search`] (GMPQ; EdMIPS with attribution weight 0).
pub struct Supernet {
    pub config: SearchConfig,
}

impl Allocator for Supernet {
    fn name(&self) -> &'static str {
        Method::Supernet.name(self.config.attribution_weight)
    }
    fn label(&self) -> &'static str {
        if self.config.attribution_weight == 0.0 {
            "EdMIPS"
        } else {
            "GMPQ"
        }
    }

    fn reads(&self) -> Reads {
        Reads::ProxyWithHeldOut
    }

    fn data_parallel(&self) -> bool {
        true
    }

    fn allocate(&self, input: AllocationInput<'_>) -> Result<Vec<Allocation>> {
        let proxy = input
            .proxy
            .ok_or_else(|| SearchError::Invalid("the supernet search needs proxy data".into()))?;
        let mut config = self.config.clone();
        // The shared warm-up only pays for itself across several budgets.
        if input.targets.len() <= 1 {
            config.warmup_epochs = 0;
        }
        let results = super::search(SearchJob {
            teacher: input.teacher.to_path_buf(),
            proxy: proxy.source,
            train_indices: proxy.train_indices,
            val_indices: proxy.val_indices,
            config,
            targets: input.targets.to_vec(),
            device: input.device,
            progress: input.progress,
            state_dir: input.state_dir,
        })?;
        Ok(results
            .into_iter()
            .map(|r| Allocation {
                target: r.target,
                policy: r.policy.clone(),
                seconds: r.seconds,
                images: r.images,
                evidence: Evidence::Supernet(Box::new(r)),
            })
            .collect())
    }
}

/// How many of `available` proxy training images a sensitivity analysis asked for `requested`
/// measures on (the first ones of the subset; at least one where there is one).
pub fn analysis_images(requested: usize, available: usize) -> usize {
    requested.clamp(1, available.max(1)).min(available)
}

/// The settings HAWQ and uniform-fill share.
pub struct Sensitivity {
    pub candidates: Candidates,
    /// Proxy training images the analysis measures on.
    pub images: usize,
    /// Hutchinson probes per batch.
    pub samples: usize,
}

impl Sensitivity {
    fn reads(&self) -> Reads {
        Reads::ProxyTrain {
            images: self.images,
        }
    }

    fn allocate(
        &self,
        rule: SensitivityRule,
        input: AllocationInput<'_>,
    ) -> Result<Vec<Allocation>> {
        let proxy = input.proxy.ok_or_else(|| {
            SearchError::Invalid("the sensitivity analysis needs proxy data".into())
        })?;
        let settings = HawqConfig {
            candidates: self.candidates.clone(),
            samples: self.samples,
        };
        let n = analysis_images(self.images, proxy.train_indices.len());
        let run = hawq::run(
            input.teacher,
            hawq::ProxyImages {
                source: proxy.source,
                indices: &proxy.train_indices[..n],
            },
            input.targets,
            &settings,
            rule,
            input.sensitivities,
            input.device,
        )?;
        Ok(run
            .policies
            .into_iter()
            .map(|(t, policy)| Allocation {
                target: Some(t),
                policy,
                seconds: run.seconds,
                images: run.images,
                evidence: Evidence::Sensitivities {
                    settings: settings.clone(),
                    sensitivities: run.sensitivities.clone(),
                },
            })
            .collect())
    }
}

/// HAWQ-style: the least summed sensitivity under the budget (exact knapsack).
pub struct Hawq(pub Sensitivity);

impl Allocator for Hawq {
    fn name(&self) -> &'static str {
        "hawq"
    }
    fn label(&self) -> &'static str {
        "HAWQ"
    }
    fn reads(&self) -> Reads {
        self.0.reads()
    }
    fn allocate(&self, input: AllocationInput<'_>) -> Result<Vec<Allocation>> {
        self.0.allocate(SensitivityRule::Hawq, input)
    }
}

/// The best uniform policy, the rest of the budget spent where the sensitivities fall most
/// ([`fill::uniform_fill_policy`]); the uniform policy itself at a grid budget.
pub struct UniformFill(pub Sensitivity);

impl Allocator for UniformFill {
    fn name(&self) -> &'static str {
        "uniform-fill"
    }
    fn label(&self) -> &'static str {
        "uniform-fill"
    }
    fn reads(&self) -> Reads {
        self.0.reads()
    }
    fn allocate(&self, input: AllocationInput<'_>) -> Result<Vec<Allocation>> {
        self.0.allocate(SensitivityRule::UniformFill, input)
    }
}

/// The uniform policy with the most BOPs within the budget.
pub struct Uniform {
    pub candidates: Candidates,
}

/// Per-layer bits drawn with `seed`, cost within [`RANDOM_TOLERANCE`] under the budget.
pub struct Random {
    pub candidates: Candidates,
    pub seed: u64,
}

/// One policy per budget from the teacher's geometry alone, by `rule`.
fn from_geometry(
    input: &AllocationInput<'_>,
    candidates: &Candidates,
    seed: Option<u64>,
    rule: impl Fn(&Policy, &Geometry, &Target) -> Result<Policy>,
) -> Result<Vec<Allocation>> {
    let started = std::time::Instant::now();
    let model = Checkpoint::load(input.teacher)?.meta.model;
    let fp = quant::build(&model, Precision::Full, tch::Device::Cpu)?;
    let (convs, fc) = (fp.net.convs(), fp.net.fc_spec());
    let geometry = Geometry::new(convs, fc);
    let mut template = Policy::uniform(
        &model,
        convs,
        candidates.weight[0],
        candidates.activation[0],
    );
    template.candidates = candidates.clone();
    input
        .targets
        .iter()
        .map(|t| {
            check_feasible(&geometry, t, candidates)?;
            let policy = rule(&template, &geometry, t)?.with_totals(convs, fc);
            Ok(Allocation {
                target: Some(*t),
                policy,
                seconds: started.elapsed().as_secs_f64(),
                images: 0,
                evidence: Evidence::Geometry { seed },
            })
        })
        .collect()
}

impl Allocator for Uniform {
    fn name(&self) -> &'static str {
        "uniform"
    }
    fn label(&self) -> &'static str {
        "uniform"
    }
    fn reads(&self) -> Reads {
        Reads::Geometry
    }
    fn allocate(&self, input: AllocationInput<'_>) -> Result<Vec<Allocation>> {
        let cands = &self.candidates;
        from_geometry(&input, cands, None, |template, geometry, t| {
            let (w, a) = fill::best_uniform(geometry, t, cands).ok_or_else(|| {
                SearchError::Invalid(format!(
                    "no uniform policy with bits in both {:?} and {:?} meets the budget {t}",
                    cands.weight, cands.activation
                ))
            })?;
            // As `Policy::uniform` writes it: its own bits as the candidates.
            let mut p = template.clone();
            for l in &mut p.layers {
                (l.w_bits, l.a_bits) = (w, a);
            }
            p.candidates = Candidates {
                weight: vec![w],
                activation: vec![a],
            };
            Ok(p)
        })
    }
}

impl Allocator for Random {
    fn name(&self) -> &'static str {
        "random"
    }
    fn label(&self) -> &'static str {
        "random"
    }
    fn reads(&self) -> Reads {
        Reads::Geometry
    }
    fn allocate(&self, input: AllocationInput<'_>) -> Result<Vec<Allocation>> {
        from_geometry(
            &input,
            &self.candidates,
            Some(self.seed),
            |template, geometry, t| {
                random_policy(
                    template,
                    geometry,
                    t,
                    RANDOM_TOLERANCE,
                    self.seed,
                    RANDOM_DRAWS,
                )
                .ok_or_else(|| {
                    SearchError::Invalid(format!(
                        "no random policy fits the budget {t}: it is below the cheapest policy"
                    ))
                })
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every name `--method` takes makes an allocator that answers to it, reads what its
    /// rule needs, and runs data-parallel only for the supernet.
    #[test]
    fn the_factory_makes_every_method() {
        for (name, _) in METHOD_NAMES {
            let (method, weight) = Method::from_name(name, 64, 4).unwrap();
            let config = SearchConfig {
                attribution_weight: weight.unwrap_or(SearchConfig::default().attribution_weight),
                ..SearchConfig::default()
            };
            let allocator = method.allocator(&config);
            assert_eq!(allocator.name(), name);
            assert_eq!(method.name(config.attribution_weight), name);
            let expected = match name {
                "gmpq" | "edmips" => Reads::ProxyWithHeldOut,
                "hawq" | "uniform-fill" => Reads::ProxyTrain { images: 64 },
                _ => Reads::Geometry,
            };
            assert_eq!(allocator.reads(), expected, "{name}");
            assert_eq!(allocator.data_parallel(), method == Method::Supernet);
        }
        assert!(Method::from_name("hawk", 64, 4).is_err());
    }

    /// The request's identity records the method as it always has (committed searches resume).
    #[test]
    fn a_method_serializes_as_recorded_searches_hold_it() {
        let json = |m: Method| serde_json::to_value(m).unwrap();
        assert_eq!(json(Method::Supernet), serde_json::json!("supernet"));
        assert_eq!(
            json(Method::UniformFill {
                images: 512,
                samples: 16
            }),
            serde_json::json!({"uniform-fill": {"images": 512, "samples": 16}})
        );
        assert_eq!(json(Method::Random), serde_json::json!("random"));
    }
}
