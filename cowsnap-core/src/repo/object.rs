//! Repositories on S3-compatible object storage: `repo:s3://BUCKET[/PREFIX]`.
//!
//! # Layout
//!
//! The same names as a directory repository, as object keys under `PREFIX/`:
//!
//! ```text
//! PREFIX/cowsnap-repo.json          format marker and chunk size (written once, by the first backup)
//! PREFIX/chunks/ab/<64 hex>         one chunk, same bytes as a chunk file (see chunk_store)
//! PREFIX/generations/<id>.idx       fixed index (see index)
//! PREFIX/generations/<id>.json      metadata, written after the index and the chunks: the publish
//! PREFIX/generations/<id>.removed   tombstone of a pruned generation (see `repo::gc`)
//! PREFIX/writers/<id>, gc/probe-*   clock probes of running backups and prunes
//! ```
//!
//! # What an object store gets instead of the file system's features
//!
//! - Atomic publish (temp → fsync → rename): a PUT is atomic (a reader sees the old
//!   object, none, or the whole new one). Every chunk a generation references is PUT
//!   before its index, the index before its metadata, and a reader lists only
//!   generations with both; so a backup whose upload fails publishes nothing.
//! - Locks (`flock`): none, and no lock objects and no conditional writes. Every key is
//!   written by one writer (a generation's two objects by its backup, whose id holds 32
//!   random bits) or is content-addressed (a chunk: two writers PUT the same bytes).
//!   What needs a lock — exports (a `flock` on their pin), the quarantine — is refused
//!   on these repositories for now ("not yet supported for s3 repositories"), before
//!   anything is touched. A live restore's pin is an object (see `repo::pin`). Prune
//!   collects garbage by rules backups follow too, timed by the store's own clock
//!   (last-modified times of probe objects; see `repo::gc`).
//! - Dedup: a backup lists `chunks/` once (1000 keys a request) and takes the chunks
//!   listed as present; a chunk written by another writer since is written again (the
//!   same bytes). A chunk is reused without reading it back (the store checksums
//!   what it keeps; `verify` reads every chunk).
//!
//! # Runtime, credentials, retries
//!
//! Each opened repository owns a small tokio runtime (2 workers) and calls it from the
//! caller's threads (`block_on`); concurrency is the caller's threads: a backup's chunk
//! workers, one request each. Endpoint, region and keys come from the standard
//! environment variables (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`; `http://` endpoints are allowed when
//! the endpoint says so), never from the command line, and no message carries them.
//! Requests use path-style addressing (`ENDPOINT/BUCKET/KEY`, what Ceph's radosgw and
//! MinIO serve without DNS set-up) and are retried on transient errors (5xx, timeouts,
//! connection errors) with exponential backoff (randomized: each wait is drawn from
//! 0.5 s to 3 times the last one, at most 15 s), up to [`MAX_RETRIES`] retries within
//! [`RETRY_TIMEOUT`] (`COWSNAP_S3_RETRY_TIMEOUT=SECONDS`, 1 to 3600, changes the
//! latter): a request gives up after about that long, so a store that is down fails a
//! backup within about two minutes, and an outage of up to about a minute (a radosgw
//! restart) is ridden out. (The waits grow by about 1.5 times a retry on average; with
//! `object_store`'s defaults of 0.1 s and twice the last, they hardly grow, and eight
//! retries gave up after about a second.)

use crate::error::{Error, Result};
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as Key;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, PutPayload, RetryConfig};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Retries of one request on transient errors (see the module notes).
pub const MAX_RETRIES: usize = 16;
/// How long one request keeps retrying, by default.
pub const RETRY_TIMEOUT: Duration = Duration::from_secs(120);
/// The environment variable that changes [`RETRY_TIMEOUT`] (seconds).
pub const RETRY_TIMEOUT_ENV: &str = "COWSNAP_S3_RETRY_TIMEOUT";

/// The retry time limit: [`RETRY_TIMEOUT`], or `COWSNAP_S3_RETRY_TIMEOUT` seconds
/// (1 to 3600).
fn retry_timeout(var: Option<String>) -> std::result::Result<Duration, String> {
    match var {
        None => Ok(RETRY_TIMEOUT),
        Some(v) => match v.trim().parse::<u64>() {
            Ok(n) if (1..=3600).contains(&n) => Ok(Duration::from_secs(n)),
            _ => Err(format!(
                "{RETRY_TIMEOUT_ENV}={v:?} is not a number of seconds from 1 to 3600"
            )),
        },
    }
}

/// The scheme of an object-store repository.
pub const SCHEME: &str = "s3://";

/// The `s3://…` URL when `dir` names an object-store repository rather than a directory.
pub fn s3_url(dir: &Path) -> Option<&str> {
    dir.to_str().filter(|s| s.starts_with(SCHEME))
}

/// Whether `dir` names an object-store repository.
pub fn is_s3(dir: &Path) -> bool {
    s3_url(dir).is_some()
}

/// The error for an operation object-store repositories do not offer yet.
pub fn unsupported(what: &str, dir: &Path) -> Error {
    crate::err!(
        Unsupported,
        "unable to {what} {}: not yet supported for s3 repositories",
        dir.display()
    )
}

/// Split `s3://BUCKET[/PREFIX]` into the bucket and the prefix (no slashes at either
/// end; empty for none), refusing what S3 or this layout cannot name.
pub fn parse_url(url: &str) -> Result<(String, String)> {
    let bad = |why: &str| {
        crate::err!(
            InvalidInput,
            "invalid repository {url:?}: {why} (expected s3://BUCKET[/PREFIX])"
        )
    };
    let rest = url
        .strip_prefix(SCHEME)
        .ok_or_else(|| bad("not an s3:// URL"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.len() < 3
        || bucket.len() > 63
        || !bucket
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
    {
        return Err(bad("the bucket name must be 3 to 63 of a-z, 0-9, '-', '.'"));
    }
    let prefix = prefix.trim_matches('/');
    if prefix.len() > 512 {
        return Err(bad("the prefix is too long"));
    }
    for part in prefix.split('/').filter(|_| !prefix.is_empty()) {
        if part.is_empty() || part == "." || part == ".." {
            return Err(bad("empty, '.' or '..' in the prefix"));
        }
        if part.bytes().any(|c| c.is_ascii_control() || c == b'\\') {
            return Err(bad("control characters or '\\' in the prefix"));
        }
    }
    Ok((bucket.to_string(), prefix.to_string()))
}

/// An opened object-store repository location: blocking get, put and list of the
/// objects under its prefix.
pub struct ObjectRepo {
    url: String,
    prefix: String,
    store: Box<dyn ObjectStore>,
    rt: tokio::runtime::Runtime,
    /// Requests made (each GET, HEAD, PUT, DELETE, and each listing), for figures.
    requests: AtomicU64,
}

/// An object's name (relative to the repository's prefix), size, and the store's
/// last-modified time of it in milliseconds since the epoch (the store's clock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Name relative to the repository's prefix.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// The store's last-modified time, ms since the epoch.
    pub modified_ms: i64,
}

impl ObjectRepo {
    /// Open `s3://BUCKET[/PREFIX]` with the endpoint and credentials of the environment.
    /// No request is made.
    pub fn open(url: &str) -> Result<ObjectRepo> {
        let (bucket, prefix) = parse_url(url)?;
        let fail =
            |why: String| crate::err!(InvalidInput, "unable to open repository {url}: {why}");
        let var = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
        if var("AWS_ACCESS_KEY_ID").is_none() || var("AWS_SECRET_ACCESS_KEY").is_none() {
            return Err(fail(
                "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL, AWS_REGION for a store other than AWS) in the environment of cowsnapctl and of the disk's daemon".into(),
            ));
        }
        let retry_timeout = retry_timeout(var(RETRY_TIMEOUT_ENV)).map_err(fail)?;
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&bucket)
            .with_virtual_hosted_style_request(false)
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(500),
                    max_backoff: Duration::from_secs(15),
                    base: 3.0,
                },
                max_retries: MAX_RETRIES,
                retry_timeout,
            })
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(10))
                    .with_timeout(Duration::from_secs(120)),
            );
        if let Some(ep) = var("AWS_ENDPOINT_URL").or_else(|| var("AWS_ENDPOINT")) {
            if ep.starts_with("http://") {
                b = b.with_allow_http(true);
            }
            b = b.with_endpoint(ep);
        }
        if var("AWS_REGION").is_none() && var("AWS_DEFAULT_REGION").is_none() {
            b = b.with_region("us-east-1");
        }
        let store = b.build().map_err(|e| fail(e.to_string()))?;
        Self::with_store(url, &prefix, Box::new(store))
    }

    /// A repository location on any `store` (an in-memory one in tests), named `url`
    /// in messages, with the keys under `prefix`.
    pub fn with_store(url: &str, prefix: &str, store: Box<dyn ObjectStore>) -> Result<ObjectRepo> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cowsnap-s3")
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| Error::io(format!("unable to open repository {url}"), e))?;
        let prefix = prefix.trim_matches('/');
        Ok(ObjectRepo {
            url: url.trim_end_matches('/').to_string(),
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
            store,
            rt,
            requests: AtomicU64::new(0),
        })
    }

    /// Requests made so far through this location.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    fn count(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// The repository's URL (for messages).
    pub fn url(&self) -> &str {
        &self.url
    }

    fn key(&self, rel: &str) -> Key {
        Key::from(format!("{}{rel}", self.prefix))
    }

    fn error(&self, op: &str, rel: &str, e: object_store::Error) -> Error {
        let kind = match &e {
            object_store::Error::NotFound { .. } => crate::ErrorKind::NotFound,
            _ => crate::ErrorKind::Io,
        };
        Error::new(kind, format!("unable to {op} {}/{rel}: {e}", self.url))
    }

    /// The object `rel` (relative to the prefix), `None` if there is none.
    pub fn get(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        self.count();
        let key = self.key(rel);
        let r = self.rt.block_on(async {
            let r = self.store.get(&key).await?;
            r.bytes().await
        });
        match r {
            Ok(b) => Ok(Some(b.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error("read", rel, e)),
        }
    }

    /// Whether the object `rel` exists.
    pub fn exists(&self, rel: &str) -> Result<bool> {
        self.count();
        let key = self.key(rel);
        match self.rt.block_on(self.store.head(&key)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.error("look up", rel, e)),
        }
    }

    /// Store `data` as the object `rel` (atomic: readers see all of it or none).
    pub fn put(&self, rel: &str, data: Vec<u8>) -> Result<()> {
        self.count();
        let key = self.key(rel);
        self.rt
            .block_on(self.store.put(&key, PutPayload::from(data)))
            .map(|_| ())
            .map_err(|e| self.error("write", rel, e))
    }

    /// Delete the object `rel`; one already gone is no error.
    pub fn delete(&self, rel: &str) -> Result<()> {
        self.count();
        let key = self.key(rel);
        match self.rt.block_on(self.store.delete(&key)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error("delete", rel, e)),
        }
    }

    /// Delete the object `rel` (one already gone is no error), giving up after
    /// `limit`: a prune's deletes must not land later than its rules allow.
    pub fn delete_within(&self, rel: &str, limit: Duration) -> Result<()> {
        self.count();
        let key = self.key(rel);
        let r = self
            .rt
            .block_on(async { tokio::time::timeout(limit, self.store.delete(&key)).await });
        match r {
            Ok(Ok(())) | Ok(Err(object_store::Error::NotFound { .. })) => Ok(()),
            Ok(Err(e)) => Err(self.error("delete", rel, e)),
            Err(_) => Err(crate::err!(
                Io,
                "unable to delete {}/{rel}: no answer within {} ms",
                self.url,
                limit.as_millis()
            )),
        }
    }

    /// The store's last-modified time of the object `rel` (ms since the epoch), `None`
    /// if there is none.
    pub fn modified(&self, rel: &str) -> Result<Option<i64>> {
        self.count();
        let key = self.key(rel);
        match self.rt.block_on(self.store.head(&key)) {
            Ok(m) => Ok(Some(m.last_modified.timestamp_millis())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error("look up", rel, e)),
        }
    }

    /// The store's clock now: PUT the (empty) object `rel`, then read its last-modified
    /// time. The only clock the repository's garbage collection trusts (see `repo::gc`).
    pub fn probe(&self, rel: &str) -> Result<i64> {
        self.put(rel, Vec::new())?;
        self.modified(rel)?.ok_or_else(|| {
            crate::err!(
                Io,
                "unable to read the store's clock: {}/{rel} vanished right after it was written",
                self.url
            )
        })
    }

    /// Every object under `rel_prefix` (a directory-like prefix such as
    /// `generations/`): names relative to the repository's prefix, and sizes.
    pub fn list(&self, rel_prefix: &str) -> Result<Vec<(String, u64)>> {
        Ok(self
            .list_meta(rel_prefix)?
            .into_iter()
            .map(|l| (l.name, l.size))
            .collect())
    }

    /// Up to `max` objects under `rel_prefix` whose names sort after `after` (all from
    /// the first when `None`), with sizes and last-modified times: one request for up
    /// to 1000 (S3's page). Returned in the store's order (by name on S3).
    pub fn list_page(
        &self,
        rel_prefix: &str,
        after: Option<&str>,
        max: usize,
    ) -> Result<Vec<Listed>> {
        let key = self.key(rel_prefix.trim_end_matches('/'));
        let stream = match after {
            Some(a) => self.store.list_with_offset(Some(&key), &self.key(a)),
            None => self.store.list(Some(&key)),
        };
        let r: std::result::Result<Vec<_>, _> =
            self.rt.block_on(stream.take(max).try_collect::<Vec<_>>());
        let metas = r.map_err(|e| self.error("list", rel_prefix, e))?;
        Ok(self.listed(metas))
    }

    /// Every object under `rel_prefix` with its size and last-modified time.
    pub fn list_meta(&self, rel_prefix: &str) -> Result<Vec<Listed>> {
        let key = self.key(rel_prefix.trim_end_matches('/'));
        let r: std::result::Result<Vec<_>, _> = self
            .rt
            .block_on(self.store.list(Some(&key)).try_collect::<Vec<_>>());
        let metas = r.map_err(|e| self.error("list", rel_prefix, e))?;
        Ok(self.listed(metas))
    }

    /// A listing's objects under this repository's prefix, counting its requests: one
    /// per page of up to 1000 keys (S3's page size).
    fn listed(&self, metas: Vec<object_store::ObjectMeta>) -> Vec<Listed> {
        self.requests.fetch_add(
            (metas.len() as u64).div_ceil(1000).max(1),
            Ordering::Relaxed,
        );
        metas
            .into_iter()
            .filter_map(|m| {
                let full = m.location.as_ref().to_string();
                full.strip_prefix(&self.prefix).map(|rel| Listed {
                    name: rel.to_string(),
                    size: m.size,
                    modified_ms: m.last_modified.timestamp_millis(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("s3://bkt").unwrap(),
            ("bkt".to_string(), String::new())
        );
        assert_eq!(
            parse_url("s3://my-bucket.x/a/b/").unwrap(),
            ("my-bucket.x".to_string(), "a/b".to_string())
        );
        for bad in [
            "s3://",
            "s3://ab",
            "s3://Upper/x",
            "s3://bkt/a//b",
            "s3://bkt/a/../b",
            "file:///x",
            "s3://bkt/a\u{1}b",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
        assert!(is_s3(Path::new("s3://bkt/p")));
        assert_eq!(retry_timeout(None).unwrap(), RETRY_TIMEOUT);
        assert_eq!(
            retry_timeout(Some("15".into())).unwrap(),
            Duration::from_secs(15)
        );
        for bad in ["0", "3601", "x", "-1", ""] {
            assert!(retry_timeout(Some(bad.into())).is_err(), "{bad}");
        }
        assert!(!is_s3(Path::new("/srv/s3://x")));
    }
}
