//! The policy model and the decision algorithm. Pure: no I/O and no async, so that `serve`,
//! `check`, `explain` and `test` share it and it can be fuzzed and benchmarked in isolation.

pub mod compile;
pub mod consent;
pub mod country;
pub mod decide;
pub mod decision;
pub mod forwarded;
pub mod model;
pub mod net;
pub mod path;
pub mod raw;

pub use compile::{Diagnostic, PolicyError, load};
pub use decide::{ConsentLookup, Env, Request, decide};
pub use decision::{Decision, Location, Reason, TraceStep, Tracer, Verdict};
pub use model::Policy;
