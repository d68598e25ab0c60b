//! Rules: per-tenant SQL over the event log's telemetry, with actions (alerts, commands).
//!
//! `sql` compiles a rule, `window` runs one rule's state machine, `repository` keeps saved
//! rules, `engine` runs every enabled rule as the consumer group `analytics-rules` with
//! checkpoints and carries out what rules emit; alerts live in `crate::alerts`.

mod actions;
mod backtest;
mod budget;
mod engine;
pub mod expr;
mod model;
mod repository;
mod shuffle;
pub mod sql;
pub mod webhooks;
pub mod window;

pub use actions::{RuleActions, dead_letters};
pub use backtest::{RerunProgress, Sources, TestReport, TestRow, test_rule};
pub(crate) use backtest::{rerun, validate_replay};
pub use engine::{RULES_GROUP, Republish, RuleEngine, RuleLog, RuleServices, RulesConfig};
pub use model::{Action, Rule, Severity};
pub use repository::{NewRule, RulePatch, Rules, validate};
