//! What amictl's exit code says (README "Exit codes"): 0 done, 1 an error (AWS unreachable, a
//! record amiflow did not write, ...), 2 the command line was wrong (clap's own refusals, and
//! input refused after reading AWS: an unknown stage, AMI or rollout), 3 the command did its job
//! and the answer needs a person (a stage halted, a group's refresh failed). Commands return these as errors; `main` maps them.

use std::process::ExitCode;

/// Input refused: exit 2. The message says what was wrong and what to do instead.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// The command answered, and the answer needs a person (a stage halted, a group failed): exit 3.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Attention(pub String);

/// `Err(Usage)` with a formatted message.
macro_rules! refuse {
    ($($arg:tt)*) => {
        return Err(anyhow::Error::new($crate::exit::Usage(format!($($arg)*))))
    };
}
pub(crate) use refuse;

/// The exit code an error of a command stands for.
pub fn code(err: &anyhow::Error) -> ExitCode {
    if err.downcast_ref::<Usage>().is_some() {
        ExitCode::from(2)
    } else if err.downcast_ref::<Attention>().is_some() {
        ExitCode::from(3)
    } else {
        ExitCode::FAILURE
    }
}
