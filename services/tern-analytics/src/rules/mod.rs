//! Rules: per-tenant SQL over the event log, with actions.

pub mod expr;
pub mod sql;
pub mod window;
