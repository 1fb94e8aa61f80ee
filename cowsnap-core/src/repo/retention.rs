//! Retention policy: which generations of a disk `prune` keeps.
//!
//! The rules are those users know from restic and Proxmox Backup Server: `keep-last N`
//! keeps the N newest generations; each `keep-<period> N` keeps the newest generation of
//! each of the N newest periods (hours, days, ISO weeks, months, years) that hold one.
//! The rules combine: a generation any rule keeps is kept.

use serde::{Deserialize, Serialize};

/// How many generations of each kind to keep. `None` (or 0) is "this rule keeps none".
/// The same names serve the command-line flags (`--keep-daily 7`) and the configuration
/// file (`keep-daily = 7`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RetentionPolicy {
    /// The N newest generations.
    pub keep_last: Option<u32>,
    /// The newest generation of each of the N newest hours that hold one.
    pub keep_hourly: Option<u32>,
    /// Of days.
    pub keep_daily: Option<u32>,
    /// Of ISO weeks.
    pub keep_weekly: Option<u32>,
    /// Of months.
    pub keep_monthly: Option<u32>,
    /// Of years.
    pub keep_yearly: Option<u32>,
}

impl RetentionPolicy {
    /// True when no rule keeps anything: such a policy would delete every generation,
    /// and `prune` refuses it.
    pub fn keeps_nothing(&self) -> bool {
        [
            self.keep_last,
            self.keep_hourly,
            self.keep_daily,
            self.keep_weekly,
            self.keep_monthly,
            self.keep_yearly,
        ]
        .iter()
        .all(|n| n.unwrap_or(0) == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_without_rules_keeps_nothing() {
        assert!(RetentionPolicy::default().keeps_nothing());
        let p = RetentionPolicy {
            keep_daily: Some(7),
            ..Default::default()
        };
        assert!(!p.keeps_nothing());
        let zero = RetentionPolicy {
            keep_last: Some(0),
            ..Default::default()
        };
        assert!(zero.keeps_nothing());
    }
}
