//! The exposition's content for a synthetic sample.

use super::exposition::{DiskSample, RepoSample, RepoScan, Sample};
use cowsnap_core::backup::{BackupState, BackupStatus, LastBackup};
use cowsnap_core::latency::{LatencyHistogram, LatencySnapshot};
use cowsnap_core::repo::{DiskUsage, RepoUsage};
use cowsnap_nbd::control::{FillInfo, IoCounters, StatusInfo};
use std::time::Duration;

fn up_disk() -> StatusInfo {
    let read = LatencyHistogram::new();
    read.record(Duration::from_micros(40)); // 50 µs bucket
    read.record(Duration::from_micros(40));
    read.record(Duration::from_millis(2)); // 2.5 ms bucket
    let write = LatencyHistogram::new();
    write.record(Duration::from_secs(60)); // overflow
    StatusInfo {
        name: "d1".into(),
        origin: "/srv/a \"b\".img".into(),
        size: 1 << 30,
        io_engine: "uring".into(),
        uptime_s: 77,
        connections: 2,
        stats: IoCounters {
            reads: 3,
            writes: 5,
            bytes_read: 12288,
            bytes_written: 20480,
            flushes: 4,
            ..Default::default()
        },
        latency: Some(LatencySnapshot {
            read: read.snapshot(),
            write: write.snapshot(),
        }),
        backup: Some(BackupStatus {
            id: 2,
            state: BackupState::Running,
            container_slots: 1024,
            container_used: 10,
            container_high_water: 900,
            holds: 7,
            hold_time_ms: 1500,
            throttled_writes: 3,
            throttle_delay_ms: 120,
            bytes_copied: 1 << 20,
            ..Default::default()
        }),
        last_success: Some(LastBackup {
            finished_unix: 1_700_000_100,
            instant_unix: 1_700_000_000,
            duration_ms: 100_000,
            bytes_copied: 4096,
            bytes_stored: 1000,
            ..Default::default()
        }),
        fill: Some(FillInfo {
            done: 5,
            total: 8,
            complete: false,
            error: None,
        }),
        tracking: Some(serde_json::json!({
            "lineage": "l", "relative_to": "g1", "changed_chunks": 42,
            "chunk_size": 65536, "in_generation": false, "seq_next": 9
        })),
        ..Default::default()
    }
}

fn sample() -> Sample {
    let mut old = up_disk();
    // what a daemon that predates the histograms and the record sends
    old.latency = None;
    old.last_success = None;
    old.backup = None;
    old.fill = None;
    let mut disks = std::collections::BTreeMap::new();
    disks.insert(
        "d1".into(),
        DiskUsage {
            generations: 3,
            newest_unix: 1_700_000_000,
            logical_bytes: 3 << 20,
        },
    );
    Sample {
        disks: vec![
            DiskSample {
                name: "d1".into(),
                status: Some(up_disk()),
            },
            DiskSample {
                name: "dead".into(),
                status: None,
            },
            DiskSample {
                name: "old".into(),
                status: Some(old),
            },
        ],
        repos: vec![
            RepoSample {
                repo: "/backup/r".into(),
                scan: Some(RepoScan {
                    usage: Ok(RepoUsage {
                        disks,
                        generations: 3,
                        chunk_files: 2,
                        stored_bytes: 1 << 20,
                        logical_bytes: 3 << 20,
                        damaged_indexes: 0,
                    }),
                    at_unix: 1_700_000_200.0,
                    took: Duration::from_millis(250),
                }),
            },
            RepoSample {
                repo: "/backup/missing".into(),
                scan: Some(RepoScan {
                    usage: Err("unable to open repository".into()),
                    at_unix: 1.0,
                    took: Duration::ZERO,
                }),
            },
            RepoSample {
                repo: "/backup/unscanned".into(),
                scan: None,
            },
        ],
        collect_time: Duration::from_millis(3),
    }
}

fn has(text: &str, line: &str) {
    assert!(
        text.lines().any(|l| l == line),
        "missing line {line:?} in:\n{text}"
    );
}

fn lacks(text: &str, prefix: &str) {
    assert!(
        !text.lines().any(|l| l.starts_with(prefix)),
        "unexpected {prefix:?} in:\n{text}"
    );
}

#[test]
fn disks_are_exposed_with_their_figures() {
    let t = sample().encode();
    has(&t, "# TYPE cowsnap_up gauge");
    has(&t, r#"cowsnap_up{disk="d1"} 1.0"#);
    has(&t, r#"cowsnap_up{disk="dead"} 0.0"#);
    lacks(&t, r#"cowsnap_writes_total{disk="dead"}"#);
    has(&t, "# TYPE cowsnap_writes_total counter");
    has(&t, r#"cowsnap_writes_total{disk="d1"} 5"#);
    has(&t, r#"cowsnap_reads_total{disk="d1"} 3"#);
    has(&t, r#"cowsnap_written_bytes_total{disk="d1"} 20480"#);
    has(&t, r#"cowsnap_flushes_total{disk="d1"} 4"#);
    has(&t, r#"cowsnap_disk_size_bytes{disk="d1"} 1073741824.0"#);
    // label values are escaped by the encoder
    has(
        &t,
        r#"cowsnap_disk_info{disk="d1",origin="/srv/a \"b\".img",io_engine="uring",read_only="false"} 1.0"#,
    );
    has(&t, r#"cowsnap_backup_state{disk="d1",state="running"} 1.0"#);
    has(&t, r#"cowsnap_backup_state{disk="d1",state="idle"} 0.0"#);
    has(&t, r#"cowsnap_backup_state{disk="old",state="idle"} 1.0"#);
    has(&t, r#"cowsnap_container_high_water_slots{disk="d1"} 900.0"#);
    has(&t, r#"cowsnap_container_slots{disk="d1"} 1024.0"#);
    has(&t, r#"cowsnap_backup_held_writes{disk="d1"} 7.0"#);
    has(&t, r#"cowsnap_backup_hold_seconds{disk="d1"} 1.5"#);
    has(
        &t,
        r#"cowsnap_backup_throttle_delay_seconds{disk="d1"} 0.12"#,
    );
    has(
        &t,
        r#"cowsnap_last_backup_success_timestamp_seconds{disk="d1"} 1700000100.0"#,
    );
    has(
        &t,
        r#"cowsnap_last_backup_duration_seconds{disk="d1"} 100.0"#,
    );
    has(&t, r#"cowsnap_last_backup_stored_bytes{disk="d1"} 1000.0"#);
    // a disk without a known backup shows 0, so an age alert fires for it too
    has(
        &t,
        r#"cowsnap_last_backup_success_timestamp_seconds{disk="old"} 0.0"#,
    );
    lacks(&t, r#"cowsnap_last_backup_bytes{disk="old"}"#);
    has(&t, r#"cowsnap_restore_chunks_done{disk="d1"} 5.0"#);
    has(&t, r#"cowsnap_restore_chunks_total{disk="d1"} 8.0"#);
    lacks(&t, r#"cowsnap_restore_chunks_done{disk="old"}"#);
    has(&t, r#"cowsnap_changelog_dirty_chunks{disk="d1"} 42.0"#);
    has(&t, r#"cowsnap_changelog_trusted{disk="d1"} 1.0"#);
}

#[test]
fn latency_histograms_are_cumulative_with_inf() {
    let t = sample().encode();
    has(&t, "# TYPE cowsnap_read_duration_seconds histogram");
    has(
        &t,
        r#"cowsnap_read_duration_seconds_bucket{disk="d1",le="2.5e-05"} 0"#,
    );
    has(
        &t,
        r#"cowsnap_read_duration_seconds_bucket{disk="d1",le="5e-05"} 2"#,
    );
    has(
        &t,
        r#"cowsnap_read_duration_seconds_bucket{disk="d1",le="0.001"} 2"#,
    );
    has(
        &t,
        r#"cowsnap_read_duration_seconds_bucket{disk="d1",le="0.0025"} 3"#,
    );
    has(
        &t,
        r#"cowsnap_read_duration_seconds_bucket{disk="d1",le="+Inf"} 3"#,
    );
    has(&t, r#"cowsnap_read_duration_seconds_count{disk="d1"} 3"#);
    has(
        &t,
        r#"cowsnap_read_duration_seconds_sum{disk="d1"} 0.00208"#,
    );
    has(
        &t,
        r#"cowsnap_write_duration_seconds_bucket{disk="d1",le="30"} 0"#,
    );
    has(
        &t,
        r#"cowsnap_write_duration_seconds_bucket{disk="d1",le="+Inf"} 1"#,
    );
    assert_eq!(
        t.matches(r#"le="+Inf""#).count(),
        2,
        "one +Inf bucket per histogram"
    );
    // an older daemon without histograms shows none
    lacks(&t, r#"cowsnap_read_duration_seconds_count{disk="old"}"#);
}

#[test]
fn repositories_are_exposed_from_their_last_scan() {
    let t = sample().encode();
    has(&t, r#"cowsnap_repo_up{repo="/backup/r"} 1.0"#);
    has(&t, r#"cowsnap_repo_up{repo="/backup/missing"} 0.0"#);
    has(&t, r#"cowsnap_repo_up{repo="/backup/unscanned"} 0.0"#);
    has(
        &t,
        r#"cowsnap_repo_generations{repo="/backup/r",disk="d1"} 3.0"#,
    );
    has(
        &t,
        r#"cowsnap_repo_last_generation_timestamp_seconds{repo="/backup/r",disk="d1"} 1700000000.0"#,
    );
    has(
        &t,
        r#"cowsnap_repo_stored_bytes{repo="/backup/r"} 1048576.0"#,
    );
    has(&t, r#"cowsnap_repo_dedup_ratio{repo="/backup/r"} 3.0"#);
    has(
        &t,
        r#"cowsnap_repo_scan_duration_seconds{repo="/backup/r"} 0.25"#,
    );
    lacks(&t, r#"cowsnap_repo_stored_bytes{repo="/backup/missing"}"#);
    lacks(
        &t,
        r#"cowsnap_repo_scan_timestamp_seconds{repo="/backup/unscanned"}"#,
    );
}

#[test]
fn every_family_has_help_and_type_once() {
    let t = sample().encode();
    let mut types = std::collections::BTreeSet::new();
    for l in t.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().unwrap().to_string();
            assert!(types.insert(name.clone()), "{name} typed twice");
            assert!(
                t.contains(&format!("# HELP {name} ")),
                "{name} without HELP"
            );
        }
    }
    assert!(types.len() > 40, "{} families", types.len());
    assert!(
        !t.contains("# EOF"),
        "Prometheus text format, not OpenMetrics"
    );
}

#[test]
fn an_empty_host_still_exposes_the_exporter() {
    let t = Sample::default().encode();
    has(&t, "# TYPE cowsnap_exporter_collect_seconds gauge");
    lacks(&t, "cowsnap_up");
}
