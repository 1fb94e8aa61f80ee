//! Retention policy: which generations of a disk `prune` keeps.
//!
//! The rules are those users know from restic and Proxmox Backup Server: `keep-last N`
//! keeps the N newest generations; each `keep-<period> N` keeps the newest generation of
//! each of the N newest periods (hours, days, ISO weeks, months, years) that hold one.
//! The rules combine: a generation any rule keeps is kept.
//!
//! # Selection ([`select`])
//!
//! - One disk's generations are ordered newest first by creation time (`created_unix`),
//!   ties broken by id (the greater id counts as newer). A creation time in the future
//!   just sorts by its value; one beyond what a calendar can hold (year 9999) counts as
//!   the last representable instant, so a damaged time never panics nor gets the
//!   generation deleted by accident of arithmetic.
//! - `keep-last N` keeps the first N; the reason is `last K`, K its rank (1 = newest).
//! - `keep-<period> N` walks the same order and keeps a generation when its period has
//!   not been seen yet, until N periods are seen: so it keeps the newest generation of
//!   each of the N newest periods holding a generation. Periods with no generation
//!   (a day without backup) do not count. Reasons name the period: `hourly
//!   2026-12-05T14`, `daily 2026-12-05`, `weekly 2026-W49` (ISO 8601 week of its ISO
//!   year, so 2027-01-01 is in `2026-W53`), `monthly 2026-12`, `yearly 2026` (the
//!   calendar year).
//! - Periods are civil times in the time zone given (the host's, for `prune`): on the
//!   day daylight saving time ends the repeated local hour is one `hourly` period, and
//!   a day of 23 or 25 hours is one `daily` period.
//! - Each rule counts on its own, and a generation is kept when any rule keeps it, with
//!   every rule that keeps it as a reason (restic's combination: the kept set of a
//!   policy is the union of the kept sets of its rules). Proxmox Backup Server differs
//!   here: there a later rule skips periods already holding a generation an earlier
//!   rule kept, so `--keep-last 3 --keep-daily 2` can keep 5 generations there but keeps
//!   3 (the two newest days are among the last 3) here.

use jiff::civil::DateTime;
use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

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

    /// The count of a period rule (0 when unset).
    fn count(&self, period: Period) -> u32 {
        match period {
            Period::Hourly => self.keep_hourly,
            Period::Daily => self.keep_daily,
            Period::Weekly => self.keep_weekly,
            Period::Monthly => self.keep_monthly,
            Period::Yearly => self.keep_yearly,
        }
        .unwrap_or(0)
    }
}

/// The calendar periods a rule can count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    /// A local clock hour.
    Hourly,
    /// A local calendar day.
    Daily,
    /// An ISO 8601 week (Monday to Sunday).
    Weekly,
    /// A calendar month.
    Monthly,
    /// A calendar year.
    Yearly,
}

impl Period {
    /// Every period, shortest first (the order reasons are listed in).
    pub const ALL: [Period; 5] = [
        Period::Hourly,
        Period::Daily,
        Period::Weekly,
        Period::Monthly,
        Period::Yearly,
    ];

    /// "hourly", "daily", ...: the rule's name without `keep-`.
    pub fn name(self) -> &'static str {
        match self {
            Period::Hourly => "hourly",
            Period::Daily => "daily",
            Period::Weekly => "weekly",
            Period::Monthly => "monthly",
            Period::Yearly => "yearly",
        }
    }

    /// The period holding the civil time `dt`: "2026-12-05T14", "2026-12-05",
    /// "2026-W49", "2026-12", "2026".
    pub fn label(self, dt: DateTime) -> String {
        match self {
            Period::Hourly => format!(
                "{:04}-{:02}-{:02}T{:02}",
                dt.year(),
                dt.month(),
                dt.day(),
                dt.hour()
            ),
            Period::Daily => format!("{:04}-{:02}-{:02}", dt.year(), dt.month(), dt.day()),
            Period::Weekly => {
                let w = dt.date().iso_week_date();
                format!("{:04}-W{:02}", w.year(), w.week())
            }
            Period::Monthly => format!("{:04}-{:02}", dt.year(), dt.month()),
            Period::Yearly => format!("{:04}", dt.year()),
        }
    }
}

/// One generation as the selection sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate<'a> {
    /// Generation id (breaks ties of equal creation times: the greater is newer).
    pub id: &'a str,
    /// Seconds since the epoch at the snapshot instant.
    pub created_unix: u64,
}

/// What the policy decides for one generation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// Kept by at least one rule.
    pub keep: bool,
    /// Every rule that keeps it ("last 1", "daily 2026-12-05", ...); empty when removed.
    pub reasons: Vec<String>,
}

/// The instant of `created_unix`; beyond the calendar's range, its last instant.
pub fn instant(created_unix: u64) -> Timestamp {
    i64::try_from(created_unix)
        .ok()
        .and_then(|s| Timestamp::from_second(s).ok())
        .unwrap_or(Timestamp::MAX)
}

/// `created_unix` as RFC 3339 with the offset of `tz` at that instant, for display:
/// "2026-12-05T14:03:00+01:00".
pub fn local_time(created_unix: u64, tz: &TimeZone) -> String {
    let ts = instant(created_unix);
    ts.display_with_offset(tz.to_offset(ts)).to_string()
}

/// Decide for each of one disk's generations whether `policy` keeps it, and why.
/// The result is in the order of `gens` (which need not be sorted); periods are civil
/// times in `tz`. See the module notes for the rules.
pub fn select(gens: &[Candidate<'_>], policy: &RetentionPolicy, tz: &TimeZone) -> Vec<Verdict> {
    let mut order: Vec<usize> = (0..gens.len()).collect();
    order.sort_by(|&a, &b| {
        (gens[b].created_unix, gens[b].id).cmp(&(gens[a].created_unix, gens[a].id))
    });
    let mut out = vec![Verdict::default(); gens.len()];
    let last = policy.keep_last.unwrap_or(0) as usize;
    for (rank, &i) in order.iter().take(last).enumerate() {
        out[i].reasons.push(format!("last {}", rank + 1));
    }
    let civil: Vec<DateTime> = gens
        .iter()
        .map(|g| tz.to_datetime(instant(g.created_unix)))
        .collect();
    for period in Period::ALL {
        let n = policy.count(period) as usize;
        let mut seen: HashSet<String> = HashSet::new();
        for &i in &order {
            if seen.len() >= n {
                break;
            }
            let label = period.label(civil[i]);
            if !seen.contains(&label) {
                out[i].reasons.push(format!("{} {label}", period.name()));
                seen.insert(label);
            }
        }
    }
    for v in &mut out {
        v.keep = !v.reasons.is_empty();
    }
    out
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

    use jiff::civil::datetime;
    use proptest::prelude::*;

    /// Central European time with its daylight saving rules (fixed, not the host's).
    fn cet() -> TimeZone {
        TimeZone::posix("CET-1CEST,M3.5.0,M10.5.0/3").unwrap()
    }

    /// Seconds since the epoch of the civil time "YYYY-MM-DDTHH:MM" in `tz`.
    fn at(tz: &TimeZone, s: &str) -> u64 {
        let n = |r: std::ops::Range<usize>| s[r].parse::<i16>().unwrap();
        let dt = datetime(
            n(0..4),
            n(5..7) as i8,
            n(8..10) as i8,
            n(11..13) as i8,
            n(14..16) as i8,
            0,
            0,
        );
        tz.to_timestamp(dt).unwrap().as_second() as u64
    }

    fn policy(f: impl FnOnce(&mut RetentionPolicy)) -> RetentionPolicy {
        let mut p = RetentionPolicy::default();
        f(&mut p);
        p
    }

    /// Run the selection on generations named by their index ("g00", "g01", ...) and
    /// return (id, reasons) of the kept ones, oldest first.
    fn kept(times: &[u64], p: &RetentionPolicy, tz: &TimeZone) -> Vec<(String, Vec<String>)> {
        let ids: Vec<String> = (0..times.len()).map(|i| format!("g{i:02}")).collect();
        let gens: Vec<Candidate> = ids
            .iter()
            .zip(times)
            .map(|(id, &t)| Candidate {
                id,
                created_unix: t,
            })
            .collect();
        let v = select(&gens, p, tz);
        assert_eq!(v.len(), gens.len());
        ids.into_iter()
            .zip(v)
            .filter(|(_, v)| {
                assert_eq!(v.keep, !v.reasons.is_empty());
                v.keep
            })
            .map(|(id, v)| (id, v.reasons))
            .collect()
    }

    fn kept_ids(times: &[u64], p: &RetentionPolicy, tz: &TimeZone) -> Vec<String> {
        kept(times, p, tz).into_iter().map(|(id, _)| id).collect()
    }

    fn owned(v: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
        v.iter()
            .map(|(id, r)| (id.to_string(), r.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    fn utc_times(v: &[&str]) -> Vec<u64> {
        v.iter().map(|s| at(&TimeZone::UTC, s)).collect()
    }

    #[test]
    fn keep_last_keeps_the_newest() {
        let t = utc_times(&[
            "2026-12-01T10:00",
            "2026-12-02T10:00",
            "2026-12-03T10:00",
            "2026-12-04T10:00",
            "2026-12-05T10:00",
        ]);
        let p = policy(|p| p.keep_last = Some(3));
        assert_eq!(
            kept(&t, &p, &TimeZone::UTC),
            owned(&[
                ("g02", &["last 3"]),
                ("g03", &["last 2"]),
                ("g04", &["last 1"])
            ])
        );
        let p = policy(|p| p.keep_last = Some(10));
        assert_eq!(kept_ids(&t, &p, &TimeZone::UTC).len(), 5);
    }

    #[test]
    fn keep_daily_keeps_the_newest_of_each_day_and_skips_empty_days() {
        // Dec 1: two, Dec 2: three, (Dec 3 none), Dec 4: one, (5, 6 none), Dec 7: two.
        let t = utc_times(&[
            "2026-12-01T08:00", // g00
            "2026-12-01T20:00", // g01
            "2026-12-02T01:00", // g02
            "2026-12-02T12:00", // g03
            "2026-12-02T23:59", // g04
            "2026-12-04T09:00", // g05
            "2026-12-07T00:00", // g06
            "2026-12-07T06:00", // g07
        ]);
        let p = policy(|p| p.keep_daily = Some(3));
        assert_eq!(
            kept(&t, &p, &TimeZone::UTC),
            owned(&[
                ("g04", &["daily 2026-12-02"]),
                ("g05", &["daily 2026-12-04"]),
                ("g07", &["daily 2026-12-07"]),
            ])
        );
        // More days asked than there are: one per day.
        let p = policy(|p| p.keep_daily = Some(30));
        assert_eq!(
            kept_ids(&t, &p, &TimeZone::UTC),
            ["g01", "g04", "g05", "g07"]
        );
    }

    #[test]
    fn keep_hourly() {
        let t = utc_times(&[
            "2026-12-05T13:10", // g00
            "2026-12-05T14:00", // g01
            "2026-12-05T14:59", // g02
            "2026-12-05T16:30", // g03
        ]);
        let p = policy(|p| p.keep_hourly = Some(2));
        assert_eq!(
            kept(&t, &p, &TimeZone::UTC),
            owned(&[
                ("g02", &["hourly 2026-12-05T14"]),
                ("g03", &["hourly 2026-12-05T16"]),
            ])
        );
    }

    #[test]
    fn keep_monthly_and_yearly_with_more_periods_asked_than_exist() {
        let t = utc_times(&[
            "2025-11-30T10:00", // g00
            "2025-12-01T10:00", // g01
            "2025-12-31T23:00", // g02
            "2026-01-15T10:00", // g03
            "2026-03-02T10:00", // g04
            "2026-03-20T10:00", // g05
        ]);
        let p = policy(|p| p.keep_monthly = Some(12));
        assert_eq!(
            kept(&t, &p, &TimeZone::UTC),
            owned(&[
                ("g00", &["monthly 2025-11"]),
                ("g02", &["monthly 2025-12"]),
                ("g03", &["monthly 2026-01"]),
                ("g05", &["monthly 2026-03"]),
            ])
        );
        let p = policy(|p| p.keep_monthly = Some(2));
        assert_eq!(kept_ids(&t, &p, &TimeZone::UTC), ["g03", "g05"]);
        let p = policy(|p| p.keep_yearly = Some(5));
        assert_eq!(
            kept(&t, &p, &TimeZone::UTC),
            owned(&[("g02", &["yearly 2025"]), ("g05", &["yearly 2026"])])
        );
    }

    #[test]
    fn iso_weeks_across_the_year_boundary() {
        let t = utc_times(&[
            "2019-12-29T12:00", // g00 Sunday: 2019-W52
            "2019-12-30T12:00", // g01 Monday: 2020-W01 (ISO year 2020)
            "2020-12-31T12:00", // g02 Thursday: 2020-W53
            "2021-01-03T12:00", // g03 Sunday: still 2020-W53
            "2021-01-04T12:00", // g04 Monday: 2021-W01
        ]);
        let p = policy(|p| p.keep_weekly = Some(10));
        assert_eq!(
            kept(&t, &p, &TimeZone::UTC),
            owned(&[
                ("g00", &["weekly 2019-W52"]),
                ("g01", &["weekly 2020-W01"]),
                ("g03", &["weekly 2020-W53"]),
                ("g04", &["weekly 2021-W01"]),
            ])
        );
        // Yearly counts calendar years, not ISO years.
        let p = policy(|p| p.keep_yearly = Some(10));
        assert_eq!(
            kept(&t, &p, &TimeZone::UTC),
            owned(&[
                ("g01", &["yearly 2019"]),
                ("g02", &["yearly 2020"]),
                ("g04", &["yearly 2021"]),
            ])
        );
    }

    #[test]
    fn periods_are_local_time_across_daylight_saving_changes() {
        let tz = cet();
        // Autumn: 2026-10-25 03:00 CEST becomes 02:00 CET; 02:30 happens twice.
        let t = [
            at(&TimeZone::UTC, "2026-10-24T21:30"), // g00 23:30 CEST, Oct 24
            at(&TimeZone::UTC, "2026-10-24T22:30"), // g01 00:30 CEST, Oct 25 (Oct 24 in UTC)
            at(&TimeZone::UTC, "2026-10-25T00:30"), // g02 02:30 CEST
            at(&TimeZone::UTC, "2026-10-25T01:30"), // g03 02:30 CET, the same local hour
            at(&TimeZone::UTC, "2026-10-25T22:30"), // g04 23:30 CET, Oct 25 (a 25-hour day)
        ];
        let p = policy(|p| p.keep_hourly = Some(3));
        assert_eq!(
            kept(&t, &p, &tz),
            owned(&[
                ("g01", &["hourly 2026-10-25T00"]),
                ("g03", &["hourly 2026-10-25T02"]),
                ("g04", &["hourly 2026-10-25T23"]),
            ])
        );
        // In UTC the same instants are four different hours.
        assert_eq!(kept_ids(&t, &p, &TimeZone::UTC), ["g02", "g03", "g04"]);
        let p = policy(|p| p.keep_daily = Some(5));
        assert_eq!(
            kept(&t, &p, &tz),
            owned(&[
                ("g00", &["daily 2026-10-24"]),
                ("g04", &["daily 2026-10-25"])
            ])
        );
        assert_eq!(kept_ids(&t, &p, &TimeZone::UTC), ["g01", "g04"]);

        // Spring: 2026-03-29 02:00 CET becomes 03:00 CEST (a 23-hour day).
        let t = [
            at(&tz, "2026-03-29T00:30"), // g00 (Mar 28 in UTC)
            at(&tz, "2026-03-29T03:10"), // g01 right after the gap
            at(&tz, "2026-03-29T23:59"), // g02 (Mar 29 in UTC)
            at(&tz, "2026-03-30T00:01"), // g03 (Mar 29 in UTC)
        ];
        assert_eq!(t[1] - t[0], 100 * 60, "the skipped hour is not counted");
        assert_eq!(
            kept(&t, &p, &tz),
            owned(&[
                ("g02", &["daily 2026-03-29"]),
                ("g03", &["daily 2026-03-30"])
            ])
        );
        assert_eq!(kept_ids(&t, &p, &TimeZone::UTC), ["g00", "g03"]);
    }

    #[test]
    fn rules_combine_and_list_every_reason() {
        // One backup a day at 10:00 from 2026-11-20 (Friday) to 2026-12-05 (Saturday).
        let t: Vec<u64> = (0..16)
            .map(|d| at(&TimeZone::UTC, "2026-11-20T10:00") + d * 86400)
            .collect();
        let p = RetentionPolicy {
            keep_last: Some(2),
            keep_daily: Some(3),
            keep_weekly: Some(2),
            keep_monthly: Some(2),
            ..Default::default()
        };
        assert_eq!(
            kept(&t, &p, &TimeZone::UTC),
            owned(&[
                ("g09", &["weekly 2026-W48"]),            // Sun Nov 29
                ("g10", &["monthly 2026-11"]),            // Mon Nov 30
                ("g13", &["daily 2026-12-03"]),           // Thu Dec 3
                ("g14", &["last 2", "daily 2026-12-04"]), // Fri Dec 4
                (
                    "g15",
                    &[
                        "last 1",
                        "daily 2026-12-05",
                        "weekly 2026-W49",
                        "monthly 2026-12"
                    ]
                ),
            ])
        );
    }

    #[test]
    fn ties_are_broken_by_id_and_the_input_order_does_not_matter() {
        let t0 = at(&TimeZone::UTC, "2026-12-05T10:00");
        let gens = [
            Candidate {
                id: "b",
                created_unix: t0,
            },
            Candidate {
                id: "c",
                created_unix: t0 - 60,
            },
            Candidate {
                id: "a",
                created_unix: t0,
            },
        ];
        let p = policy(|p| {
            p.keep_last = Some(1);
            p.keep_daily = Some(1)
        });
        let v = select(&gens, &p, &TimeZone::UTC);
        assert_eq!(v[0].reasons, ["last 1", "daily 2026-12-05"]);
        assert!(!v[1].keep && !v[2].keep);
        let p = policy(|p| p.keep_last = Some(2));
        let v = select(&gens, &p, &TimeZone::UTC);
        assert_eq!(v[2].reasons, ["last 2"]);
        assert!(!v[1].keep);
    }

    #[test]
    fn future_and_absurd_creation_times_sort_by_time() {
        let t = vec![
            at(&TimeZone::UTC, "2030-01-01T00:00"), // g00: in the future of the others
            at(&TimeZone::UTC, "2026-12-05T10:00"), // g01
            u64::MAX,                               // g02: beyond the calendar
            at(&TimeZone::UTC, "2026-12-06T10:00"), // g03
        ];
        let p = policy(|p| p.keep_last = Some(2));
        assert_eq!(
            kept(&t, &p, &TimeZone::UTC),
            owned(&[("g00", &["last 2"]), ("g02", &["last 1"])])
        );
        let p = policy(|p| p.keep_yearly = Some(2));
        assert_eq!(
            kept(&t, &p, &TimeZone::UTC),
            owned(&[("g00", &["yearly 2030"]), ("g02", &["yearly 9999"])])
        );
        assert!(local_time(u64::MAX, &cet()).starts_with("9999-12-3"));
        assert_eq!(
            local_time(at(&TimeZone::UTC, "2026-07-01T12:00"), &cet()),
            "2026-07-01T14:00:00+02:00"
        );
    }

    #[test]
    fn no_generations_no_verdicts() {
        let p = policy(|p| p.keep_last = Some(3));
        assert!(select(&[], &p, &TimeZone::UTC).is_empty());
    }

    proptest! {
        #[test]
        fn keep_last_keeps_min_n_len(times in prop::collection::vec(1_500_000_000u64..1_900_000_000, 0..40), n in 0u32..50) {
            let p = policy(|p| p.keep_last = Some(n));
            prop_assert_eq!(kept_ids(&times, &p, &cet()).len(), (n as usize).min(times.len()));
        }

        #[test]
        fn a_combined_policy_keeps_the_union_of_its_rules(
            // Hours apart, a few years long, with duplicates likely.
            hours in prop::collection::vec(0u64..30_000, 0..60),
            counts in prop::array::uniform6(0u32..6),
        ) {
            let tz = cet();
            let times: Vec<u64> = hours.iter().map(|h| 1_600_000_000 + h * 3600 + h % 7 * 60).collect();
            let [l, h, d, w, m, y] = counts;
            let all = RetentionPolicy {
                keep_last: Some(l), keep_hourly: Some(h), keep_daily: Some(d),
                keep_weekly: Some(w), keep_monthly: Some(m), keep_yearly: Some(y),
            };
            let singles = [
                policy(|p| p.keep_last = Some(l)),
                policy(|p| p.keep_hourly = Some(h)),
                policy(|p| p.keep_daily = Some(d)),
                policy(|p| p.keep_weekly = Some(w)),
                policy(|p| p.keep_monthly = Some(m)),
                policy(|p| p.keep_yearly = Some(y)),
            ];
            let mut union: Vec<String> = singles.iter().flat_map(|p| kept_ids(&times, p, &tz)).collect();
            union.sort();
            union.dedup();
            prop_assert_eq!(kept_ids(&times, &all, &tz), union);
            // Each period rule keeps at most N, one per period.
            for (p, n) in singles.iter().zip(counts) {
                prop_assert!(kept_ids(&times, p, &tz).len() <= n as usize);
            }
        }
    }
}
