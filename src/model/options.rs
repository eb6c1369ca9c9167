//! Which model-shaping options apply to which network, in one table that every command
//! checks its flags against: a flag that would be ignored is refused instead.

use super::{Arch, ModelError};
use std::path::Path;

/// A command-line option that shapes the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelOption {
    Model,
    Stem,
    Width,
    InputSize,
    Channels,
    Classes,
    Rgb,
}

impl ModelOption {
    pub fn flag(self) -> &'static str {
        match self {
            ModelOption::Model => "--model",
            ModelOption::Stem => "--stem",
            ModelOption::Width => "--width",
            ModelOption::InputSize => "--input-size",
            ModelOption::Channels => "--channels",
            ModelOption::Classes => "--classes",
            ModelOption::Rgb => "--rgb",
        }
    }

    /// Whether the option shapes `arch`, from its row in [`super::ARCHS`] (the CIFAR ResNets
    /// and EfficientNet-Lite0 have one stem; only MobileNetV2 has a width multiplier).
    pub fn applies_to(self, arch: Arch) -> bool {
        match self {
            ModelOption::Stem => arch.entry().traits.stem_choice,
            ModelOption::Width => arch.entry().traits.width_multiplier,
            ModelOption::Model
            | ModelOption::InputSize
            | ModelOption::Channels
            | ModelOption::Classes
            | ModelOption::Rgb => true,
        }
    }
}

/// Where a command's network comes from.
#[derive(Debug, Clone, Copy)]
pub enum ModelSource<'a> {
    /// Built from `--model` and the shaping flags.
    Named(Arch),
    /// Read from a file (a checkpoint, a policy): every shaping flag would be ignored.
    File { flag: &'a str, path: &'a Path },
}

/// Refuses every option in `given` that does not shape the network from `source`.
pub fn check_options(source: ModelSource, given: &[ModelOption]) -> Result<(), ModelError> {
    for &option in given {
        match source {
            ModelSource::Named(arch) if !option.applies_to(arch) => {
                return Err(ModelError::Invalid(format!(
                    "{} applies to {} only, not {arch}",
                    option.flag(),
                    super::arch_names_where(|e| option.applies_to(e.arch))
                )));
            }
            ModelSource::File { flag, path } => {
                return Err(ModelError::Invalid(format!(
                    "{} does not apply with {flag}: the model comes from {}",
                    option.flag(),
                    path.display()
                )));
            }
            ModelSource::Named(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_refuses_what_a_network_ignores() {
        use ModelOption::*;
        assert!(check_options(ModelSource::Named(Arch::MobileNetV2), &[Stem, Width]).is_ok());
        let e = check_options(ModelSource::Named(Arch::ResNet20), &[Stem]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--stem applies to resnet18, resnet50, mobilenetv2 only, not resnet20"
        );
        assert!(check_options(ModelSource::Named(Arch::ResNet18), &[Width]).is_err());
        let file = ModelSource::File {
            flag: "--init",
            path: Path::new("a.safetensors"),
        };
        assert!(check_options(file, &[]).is_ok());
        let e = check_options(file, &[InputSize]).unwrap_err().to_string();
        assert!(e.contains("--input-size") && e.contains("--init"), "{e}");
    }
}
