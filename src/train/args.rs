//! The command-line forms of training, fine-tuning and post-training quantization, and the
//! requests they state.

use super::{Finetune, InitFrom, PtqRequest, TrainConfig, TrainError, TrainRequest};
use crate::checkpoint::Checkpoint;
use crate::data::{parse_spec_flag, SubsetArgs, SubsetSpec};
use crate::flags::positive;
use crate::model::options::{check_options, ModelOption, ModelSource};
use crate::model::Stem;
use crate::policy::{parse_numerics, PolicyChoice};
use crate::quant::{CalibrationMethod, Numerics, Precision};
use clap::Args;
use std::path::PathBuf;

/// The library's training recipe, whose values are the flags' defaults.
fn defaults() -> TrainConfig {
    TrainConfig::default()
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// A full-precision checkpoint to start from. train: its network and weights (an
    /// imported network: `gmpq import --onnx`); finetune (required): the network to quantize.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// train: resnet20 (default), resnet32, resnet56, resnet18, resnet50, mobilenetv2 or
    /// efficientnet-lite0. finetune takes the model from --init and refuses this flag.
    #[arg(long)]
    pub model: Option<String>,
    /// Training data, KIND:PATH (the test split of the same spec is evaluated each epoch).
    #[arg(long, default_value = "bundled:fashion-mnist")]
    pub data: String,
    /// Separate evaluation data (default: the test split of --data).
    #[arg(long)]
    pub test_data: Option<String>,
    /// Model input resolution (default: the data's own).
    #[arg(long, value_parser = positive(), allow_negative_numbers = true)]
    pub input_size: Option<usize>,
    /// Expand gray images to 3 channels.
    #[arg(long)]
    pub rgb: bool,
    /// Stem of resnet18/50 and mobilenetv2: cifar or imagenet (default: cifar below 64 px).
    #[arg(long)]
    pub stem: Option<String>,
    /// Width multiplier of mobilenetv2 [default: 1].
    #[arg(long, allow_negative_numbers = true)]
    pub width: Option<f64>,
    /// Passes over the training images.
    #[arg(long, default_value_t = defaults().epochs, value_parser = positive(), allow_negative_numbers = true)]
    pub epochs: usize,
    /// Images per step (of all ranks together in a data-parallel run: each of N ranks
    /// computes B/N).
    #[arg(long, default_value_t = defaults().batch_size, value_parser = positive(), allow_negative_numbers = true)]
    pub batch_size: usize,
    /// Learning rate [default: 0.1; finetune: 0.01].
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f64>,
    /// SGD momentum.
    #[arg(long, default_value_t = defaults().momentum, allow_negative_numbers = true)]
    pub momentum: f64,
    /// Weight decay [default: 5e-4; finetune: 4e-5].
    #[arg(long = "wd", value_name = "WD", allow_negative_numbers = true)]
    pub weight_decay: Option<f64>,
    /// cosine, constant, or step:EPOCHS:GAMMA (e.g. step:10:0.1).
    #[arg(long, default_value = "cosine")]
    pub schedule: String,
    /// Random-crop padding in pixels (0 disables random crops).
    #[arg(long, default_value_t = defaults().augment.crop_padding, allow_negative_numbers = true)]
    pub crop_padding: usize,
    /// Random horizontal flips (not for digits).
    #[arg(long)]
    pub hflip: bool,
    /// Seed of the weights, the batches and the augmentation.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub seed: u64,
    #[command(flatten)]
    pub subset: SubsetArgs,
    /// Hold out this many training images (a fixed stratified draw, the same for every
    /// seed) for validation: never trained on, evaluated after each epoch (val top-1).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub holdout: usize,
    /// Evaluate on at most this many test images (stratified).
    #[arg(long, value_parser = positive(), allow_negative_numbers = true)]
    pub test_limit: Option<usize>,
    /// Output folder (checkpoint last.safetensors + last.json); default runs/train (train),
    /// runs/finetune (finetune).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue from the last complete epoch in --out.
    #[arg(long)]
    pub resume: bool,
    /// Print the final metrics as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

impl TrainArgs {
    /// The shaping options given on the command line.
    pub fn given(&self) -> Vec<ModelOption> {
        use ModelOption as O;
        [
            (self.model.is_some(), O::Model),
            (self.input_size.is_some(), O::InputSize),
            (self.rgb, O::Rgb),
            (self.stem.is_some(), O::Stem),
            (self.width.is_some(), O::Width),
        ]
        .into_iter()
        .filter_map(|(given, o)| given.then_some(o))
        .collect()
    }

    /// The training these flags state (a fine-tuning with `finetune`).
    pub fn request(&self, finetune: Option<Finetune>) -> Result<TrainRequest, TrainError> {
        let mut r = TrainRequest::new(
            parse_spec_flag("--data", &self.data)?,
            self.out.clone().unwrap_or_else(|| "runs/train".into()),
        );
        r.arch = self.model.as_deref().unwrap_or("resnet20").parse()?;
        let finetune = match (finetune, &self.init) {
            (Some(f), _) => Some(f),
            (None, Some(init)) => Some(self.continued(init)?),
            (None, None) => {
                check_options(ModelSource::Named(r.arch), &self.given())?;
                None
            }
        };
        r.test_data = self
            .test_data
            .as_deref()
            .map(|t| parse_spec_flag("--test-data", t))
            .transpose()?;
        r.input_size = self.input_size;
        r.rgb = self.rgb;
        r.stem = self.stem.as_deref().map(str::parse::<Stem>).transpose()?;
        r.width = self.width.unwrap_or(1.0);
        r.epochs = self.epochs;
        r.batch_size = self.batch_size;
        r.lr = self.lr;
        r.momentum = self.momentum;
        r.weight_decay = self.weight_decay;
        r.schedule = self.schedule.parse()?;
        r.augment = super::Augment {
            crop_padding: self.crop_padding,
            hflip: self.hflip,
        };
        r.seed = self.seed;
        r.subset = SubsetSpec {
            holdout: self.holdout,
            ..self.subset.spec()
        };
        r.test_limit = self.test_limit;
        r.resume = self.resume;
        r.finetune = finetune;
        Ok(r)
    }

    /// Full-precision training that starts from `init`'s network and weights.
    fn continued(&self, init: &std::path::Path) -> Result<Finetune, TrainError> {
        let flag = ModelSource::File {
            flag: "--init",
            path: init,
        };
        // The data's channels and size are adapted to the network (gray to RGB, resize).
        let given: Vec<ModelOption> = self
            .given()
            .into_iter()
            .filter(|o| *o != ModelOption::Rgb)
            .collect();
        check_options(flag, &given)?;
        let ck = Checkpoint::load(init)?;
        Ok(Finetune {
            init: InitFrom {
                checkpoint: init.to_path_buf(),
                calibration: super::CALIBRATION,
                calibration_images: super::CALIBRATION_IMAGES,
            },
            model: ck.meta.model,
            precision: Precision::Full,
        })
    }
}

#[derive(Debug, Args)]
pub struct FinetuneArgs {
    #[command(flatten)]
    pub policy: PolicyChoice,
    /// How the activation clips are calibrated.
    #[arg(long, value_enum, default_value = "kl")]
    pub calibration: CalibrationMethod,
    /// Training images used to calibrate before fine-tuning.
    #[arg(long = "calib-limit", value_name = "N", alias = "calib-images", default_value_t = super::CALIBRATION_IMAGES, value_parser = positive(), allow_negative_numbers = true)]
    pub calib_images: usize,
    /// Per-output-channel weight thresholds.
    #[arg(long)]
    pub per_channel: bool,
    /// integer (default): batch norm folded, int32 biases and every conv output and residual
    /// sum re-quantized, exactly what the exported graph's integer kernels compute;
    /// fake-quant: the reference's float batch norm and residuals (slower to deploy).
    #[arg(long, default_value = "integer", value_parser = parse_numerics)]
    pub numerics: Numerics,
    #[command(flatten)]
    pub train: TrainArgs,
}

impl FinetuneArgs {
    /// The full-precision checkpoint to quantize (`--init`, required).
    pub fn init(&self) -> Result<&std::path::Path, TrainError> {
        self.train.init.as_deref().ok_or_else(|| {
            TrainError::Invalid(
                "give --init: the full-precision checkpoint to fine-tune (from gmpq train or gmpq import)".into(),
            )
        })
    }

    /// The fine-tuning these flags state: the model from `--init`, the policy checked
    /// against it.
    pub fn request(mut self) -> Result<TrainRequest, TrainError> {
        let init = self.init()?.to_path_buf();
        check_options(
            ModelSource::File {
                flag: "--init",
                path: &init,
            },
            &self.train.given(),
        )?;
        self.train.out.get_or_insert_with(|| "runs/finetune".into());
        let ck = Checkpoint::load(&init)?;
        let (_, geometry) = super::build_fp(&ck.meta.model, tch::Device::Cpu)?;
        let policy = self
            .policy
            .resolve(&ck.meta.model, geometry.convs(), geometry.fc_spec())
            .map_err(|e| TrainError::Invalid(e.to_string()))?
            .ok_or_else(|| TrainError::Invalid("give --policy FILE or --uniform wXaY".into()))?;
        // resolve has checked the policy against the model and set its totals: no second
        // load and network build through Finetune::new.
        let finetune = Finetune {
            init: InitFrom {
                checkpoint: init,
                calibration: self.calibration,
                calibration_images: self.calib_images,
            },
            model: ck.meta.model,
            precision: Precision::Fixed {
                policy,
                per_channel: self.per_channel,
                numerics: self.numerics,
            },
        };
        self.train.request(Some(finetune))
    }
}

/// `gmpq quantize`: post-training quantization by calibration alone.
#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// Full-precision checkpoint (from `gmpq train` or `gmpq import`).
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[command(flatten)]
    pub policy: PolicyChoice,
    /// Data to calibrate on (its train split), KIND:PATH.
    #[arg(long)]
    pub calib_data: String,
    /// Calibration images (a stratified subset of the train split).
    #[arg(long = "calib-limit", value_name = "N", alias = "calib-images", default_value_t = super::CALIBRATION_IMAGES, value_parser = positive(), allow_negative_numbers = true)]
    pub calib_images: usize,
    /// How the activation clips are calibrated.
    #[arg(long, value_enum, default_value = "kl")]
    pub calibration: CalibrationMethod,
    /// Per-output-channel weight thresholds (the reference is per tensor).
    #[arg(long)]
    pub per_channel: bool,
    /// integer (default): batch norm folded, int32 biases and every conv output and residual
    /// sum re-quantized, exactly what the exported graph's integer kernels compute;
    /// fake-quant: the reference's float batch norm and residuals (slower to deploy).
    #[arg(long, default_value = "integer", value_parser = parse_numerics)]
    pub numerics: Numerics,
    /// Data to evaluate on (its test split; default: --calib-data).
    #[arg(long)]
    pub eval_data: Option<String>,
    /// Evaluate on at most this many test images (stratified).
    #[arg(long = "test-limit", value_name = "N", alias = "eval-limit", value_parser = positive(), allow_negative_numbers = true)]
    pub eval_limit: Option<usize>,
    /// Where to save the quantized checkpoint.
    #[arg(long)]
    pub out: PathBuf,
    /// Print the result as one JSON document on stdout.
    #[arg(long)]
    pub json: bool,
}

impl QuantizeArgs {
    /// The post-training quantization these flags state.
    pub fn request(&self) -> Result<PtqRequest, TrainError> {
        let calib_data = parse_spec_flag("--calib-data", &self.calib_data)?;
        Ok(PtqRequest {
            checkpoint: self.checkpoint.clone(),
            policy: self.policy.source()?.ok_or_else(|| {
                TrainError::Invalid("give --policy FILE or --uniform wXaY".into())
            })?,
            per_channel: self.per_channel,
            numerics: self.numerics,
            calibration: self.calibration,
            eval_data: match &self.eval_data {
                Some(s) => parse_spec_flag("--eval-data", s)?,
                None => calib_data.clone(),
            },
            calib_data,
            calib_images: self.calib_images,
            eval_limit: self.eval_limit,
            out: self.out.clone(),
        })
    }
}
