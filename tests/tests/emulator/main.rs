//! amiflow's extensions to the moto emulator, through the Rust SDK: what only the
//! SDK the workers use can show, its deserialisation of the shim's replies (instance refreshes,
//! groups, launch template versions, stacks) and its paging. The shim's behaviour itself is owned
//! by the boto3 suite in local/tests (run by tests/shim_checks.rs).
//!
//! Every test starts its own emulator through the one fixture (`fixture::emulator`) and asserts
//! on the resulting state. Progress is observed by polling with a deadline; nothing sleeps to
//! synchronise.

mod cloudformation;
mod fixture;
mod images;
mod refresh;
mod templates;
