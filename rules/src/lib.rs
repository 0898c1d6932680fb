//! edgesync's local rule engine: eKuiper-style streaming SQL evaluated on the gateway, online
//! or not.
//!
//! Pure, like the protocol's session: the engine takes accepted twin changes and the time
//! (`now`, milliseconds since the Unix epoch, injected) and hands back what the rules produced;
//! it reads no clock and does no I/O. The agent's runner feeds it and carries its outputs out
//! (local MQTT, the hub, tag writes, logs), and reads rule files ([`parse_rule_file`]) and
//! lookup-table files ([`load_table_file`]) for it.
//!
//! Modules: [`plan`] (the SQL subset, planning, expressions), [`engine`] (evaluation order,
//! alarms, heartbeats), [`window`], [`aggregate`], [`functions`], [`analytic`] (`lag`,
//! `had_changed`, ... with `OVER`), [`table`] (lookup tables), [`rule`] (rule files),
//! [`dialect`] (the SQL dialect).

#![warn(missing_docs)]

pub mod aggregate;
pub mod analytic;
pub mod dialect;
pub mod engine;
pub mod functions;
pub mod plan;
pub mod rule;
pub mod table;
pub mod value;
pub mod window;

pub use engine::{Alarm, Engine, Output, RuleStats};
pub use plan::{Catalog, ColType, LoadError};
pub use rule::{Action, AlarmDef, RuleDef, RuleFileError, parse_rule_file};
pub use table::{Table, load_table_file};
pub use value::Value;
