//! Rules: per-tenant SQL over the event log's telemetry, with actions (alerts, commands).
//!
//! `sql` compiles a rule, `window` runs one rule's state machine, `repository` keeps saved
//! rules, `engine` runs the enabled rules on the event log and carries out what they emit,
//! `slots` keeps their state per partition with checkpoints, and `shuffle` carries fleet-wide
//! rules' messages between the engine's two stages; alerts live in `crate::alerts`.

mod actions;
mod backtest;
mod budget;
mod engine;
pub mod expr;
mod model;
mod repository;
mod shuffle;
mod slots;
pub mod sql;
pub mod webhooks;
pub mod window;

pub use actions::{RuleActions, dead_letters};
pub use backtest::{RerunProgress, Sources, TestReport, TestRow, test_rule};
pub(crate) use backtest::{rerun, validate_replay};
pub use engine::{RULES_GROUP, Republish, RuleEngine, RuleLog, RuleServices, RulesConfig};
pub use model::{Action, Rule, Severity};
pub use repository::{NewRule, RulePatch, Rules, validate};
