//! Value parsers shared by the command-line forms of the library's settings (the `cli`
//! feature): each settings type derives its flags, with their help and defaults, in the
//! module that runs it.

use clap::builder::TypedValueParser as _;

/// A count that must be at least 1 (clap names the flag when it is not).
pub fn positive() -> impl clap::builder::TypedValueParser<Value = usize> {
    clap::builder::StringValueParser::new().try_map(|s| match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_string()),
        Ok(n) => Ok(n),
        Err(_) => Err("expected a whole number, at least 1".to_string()),
    })
}
