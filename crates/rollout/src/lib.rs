//! The rollout: one step per worker (DESIGN.md section 4), each a plain async function over the
//! narrow AWS capabilities in [`aws`], plus the rollout [`policy`], the shared effective-AMI
//! [`discovery`] and the refresh [`mark`] a group carries, and the promotion [`gate`] between stages. [`workers`] adapts each step to the
//! runtime's [`runtime::Step`], and `src/bin/*-worker.rs` are the thin binaries.
//!
//! Steps never see a queue and never keep private state: every decision is made from what AWS
//! itself says now (parameters, launch template versions, group tags, refresh status), which is
//! what makes delivering any event twice, or late, harmless.

pub mod aws;
pub mod control;
pub mod discovery;
#[cfg(test)]
mod fake;
pub mod gate;
pub mod ingest;
pub mod mark;
pub mod param;
pub mod plan;
pub mod policy;
pub mod refresh;
pub mod share;
pub mod workers;
