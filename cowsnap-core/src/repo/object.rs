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
//!
//! # Answers that break off
//!
//! `object_store` retries a request that fails before the response's headers arrive,
//! but not a listing whose body breaks off half-way (radosgw stopped while it sent a
//! page), and a GET's body only within the request's own retries (and only with an
//! ETag): the error came back at once, and a backup failed on a radosgw restart of two
//! seconds. So every read here (each GET, each
//! listing) retries such a failure itself ([`Retries`]), and only such a failure: an
//! answer that broke off after its headers (connection reset, closed, timed out while
//! the body was read). A definite answer (not found, access denied, any status the
//! store sent) is never retried here, and neither is a request whose own retries
//! `object_store` already spent (it is no broken body: retrying it would start a whole
//! retry period again for each of ours, a multiple of the bound). A read's retries of
//! broken answers share one deadline: they stop once the retry time limit has passed
//! since the first failure, and a retried request still running at that time plus
//! one last wait is cut off — the same bound as one request's, so a store that stays
//! down fails a read within it, never within a multiple of it. A listing resumes after
//! the last key it received; a page that arrives starts the deadline afresh (the store
//! answers again: only a store that answers nothing runs into it). HEAD has no body
//! and is left to `object_store`'s retries.

use crate::error::{Error, Result};
use futures_util::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as Key;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, PutPayload, RetryConfig};
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Retries of one request on transient errors (see the module notes).
pub const MAX_RETRIES: usize = 16;
/// How long one request keeps retrying, by default.
pub const RETRY_TIMEOUT: Duration = Duration::from_secs(120);
/// The environment variable that changes [`RETRY_TIMEOUT`] (seconds).
pub const RETRY_TIMEOUT_ENV: &str = "COWSNAP_S3_RETRY_TIMEOUT";
/// The longest wait between two retries, `object_store`'s (see the module notes) and
/// ours of broken answers: also the one last wait a read may take past the limit.
const MAX_BACKOFF: Duration = Duration::from_secs(15);
/// The first wait before a read whose answer broke off is made again; each later wait
/// is twice the last, at most [`MAX_BACKOFF`]. Short: a request made again meets a
/// store that is still down with `object_store`'s own retries of refused connections.
const BROKEN_FIRST_WAIT: Duration = Duration::from_millis(500);

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
    /// How long a read retries answers that broke off (see [`Retries`]).
    retry_timeout: Duration,
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
                    max_backoff: MAX_BACKOFF,
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
        Ok(Self::with_store(url, &prefix, Box::new(store))?.with_retry_timeout(retry_timeout))
    }

    /// Give up retrying broken answers after `limit` (see the module notes); the
    /// default is [`RETRY_TIMEOUT`]. Set to the store's own retry time limit.
    pub fn with_retry_timeout(mut self, limit: Duration) -> ObjectRepo {
        self.retry_timeout = limit;
        self
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
            retry_timeout: RETRY_TIMEOUT,
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
        let key = self.key(rel);
        let mut retries = self.retries("read", rel);
        let r = self.rt.block_on(async {
            loop {
                self.count();
                let attempt = async {
                    let r = self.store.get(&key).await?;
                    r.bytes().await
                };
                match retries.bounded(attempt).await {
                    Ok(Ok(b)) => return Ok(b),
                    Ok(Err(e)) => retries.after(e).await?,
                    Err(e) => return Err(e),
                }
            }
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
        let metas = self.list_keys(rel_prefix, after, max)?;
        Ok(self.listed(metas))
    }

    /// Every object under `rel_prefix` with its size and last-modified time.
    pub fn list_meta(&self, rel_prefix: &str) -> Result<Vec<Listed>> {
        let metas = self.list_keys(rel_prefix, None, usize::MAX)?;
        Ok(self.listed(metas))
    }

    /// Up to `max` objects under `rel_prefix` after `after` (from the first when
    /// `None`), in the store's order. A listing whose answer breaks off is resumed after
    /// the last key received (see [`Retries`]); S3 lists in key order, so the resumed
    /// listing goes on where the broken one stopped, without a key twice.
    fn list_keys(
        &self,
        rel_prefix: &str,
        after: Option<&str>,
        max: usize,
    ) -> Result<Vec<object_store::ObjectMeta>> {
        let key = self.key(rel_prefix.trim_end_matches('/'));
        let after = after.map(|a| self.key(a));
        let mut retries = self.retries("list", rel_prefix);
        let mut metas: Vec<object_store::ObjectMeta> = Vec::new();
        let r = self.rt.block_on(async {
            loop {
                let from = metas.last().map(|m| &m.location).or(after.as_ref());
                let mut stream = match from {
                    Some(a) => self.store.list_with_offset(Some(&key), a),
                    None => self.store.list(Some(&key)),
                };
                let failed = loop {
                    if metas.len() >= max {
                        return Ok(());
                    }
                    match retries.bounded(stream.next()).await? {
                        None => return Ok(()),
                        Some(Ok(m)) => {
                            metas.push(m);
                            retries.progress();
                        }
                        Some(Err(e)) => break e,
                    }
                };
                retries.after(failed).await?;
                // The request made again is counted here; the listing's pages are
                // counted by `listed`.
                self.count();
            }
        });
        r.map_err(|e| self.error("list", rel_prefix, e))?;
        Ok(metas)
    }

    /// The retries of one read (`op` of `rel`, for messages) under this location's
    /// retry time limit.
    fn retries(&self, op: &'static str, rel: &str) -> Retries {
        Retries {
            what: format!("{op} {}/{rel}", self.url),
            limit: self.retry_timeout,
            since: None,
            retries: 0,
            next_wait: BROKEN_FIRST_WAIT,
            first: None,
        }
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

/// Whether `e` is an answer that broke off after its headers arrived: a connection
/// closed, reset, refused or timed out while the body was read (`object_store` hands
/// that back as a [`object_store::client::HttpError`] inside a generic error, e.g.
/// "Error getting list response body: HTTP error: request or response body error").
/// Nothing else is: not a definite answer (not found, access denied, a precondition,
/// any status the store sent), not a body that arrived whole but could not be decoded
/// (the same bytes would come again), and not a request whose own retries
/// `object_store` spent — its error carries the transport error only under its retry
/// error (which hides the `HttpError` itself), so it is never taken for a broken body
/// and never retried a second time over.
fn broken_answer(e: &object_store::Error) -> bool {
    use object_store::client::{HttpError, HttpErrorKind};
    let object_store::Error::Generic { source, .. } = e else {
        return false;
    };
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(source.as_ref());
    while let Some(err) = cur {
        if let Some(inner) = err.downcast_ref::<object_store::Error>() {
            // A GET's body retried within `object_store` wraps the request's error:
            // only a generic one may hold a broken answer.
            if !matches!(inner, object_store::Error::Generic { .. }) {
                return false;
            }
        }
        if let Some(h) = err.downcast_ref::<HttpError>() {
            return matches!(
                h.kind(),
                HttpErrorKind::Connect
                    | HttpErrorKind::Request
                    | HttpErrorKind::Timeout
                    | HttpErrorKind::Interrupted
                    | HttpErrorKind::Unknown
            );
        }
        cur = err.source();
    }
    false
}

/// Why a read gave up retrying answers that broke off (the source of the generic
/// error it returns): how often it retried, for how long, and the last failure.
#[derive(Debug)]
struct GaveUp(String);

impl std::fmt::Display for GaveUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for GaveUp {}

/// The retries of one read (a GET, a listing) whose answers break off (see the module
/// notes): up to [`MAX_RETRIES`], waiting [`BROKEN_FIRST_WAIT`] first and twice the
/// last wait after (at most [`MAX_BACKOFF`]), while less than `limit` has passed since
/// the first failure; a retried request still running at that deadline plus one last
/// wait ([`MAX_BACKOFF`], or `limit` if shorter) is cut off. A listing's progress (a key received) ends a stretch
/// of failures: the next failure starts the deadline and the count afresh.
struct Retries {
    /// What is retried, for messages: "list s3://bucket/prefix/chunks/".
    what: String,
    limit: Duration,
    /// The first failure of this stretch; `None`: none since the last progress.
    since: Option<Instant>,
    retries: usize,
    next_wait: Duration,
    /// The failure that started this stretch, for the message of a retry cut off.
    first: Option<String>,
}

impl Retries {
    /// `f`, or the give-up error if it does not end before the deadline (only while
    /// retrying: a first attempt has no deadline of ours).
    async fn bounded<F: Future>(
        &self,
        f: F,
    ) -> std::result::Result<F::Output, object_store::Error> {
        let Some(since) = self.since else {
            return Ok(f.await);
        };
        // The limit, plus one last wait as one request may take past it (its own
        // retries' last, at most MAX_BACKOFF; no longer than the limit itself when that
        // is shorter).
        let deadline = since + self.limit + MAX_BACKOFF.min(self.limit);
        match tokio::time::timeout_at(deadline.into(), f).await {
            Ok(r) => Ok(r),
            Err(_) => {
                let why = format!(
                    "no complete answer within {} s after {} retries of a broken answer ({})",
                    since.elapsed().as_secs(),
                    self.retries,
                    self.first.as_deref().unwrap_or("")
                );
                log::warn!("{}: {why}; giving up", self.what);
                Err(object_store::Error::Generic {
                    store: "S3",
                    source: Box::new(GaveUp(why)),
                })
            }
        }
    }

    /// Progress (a listing received a key): the stretch of failures is over.
    fn progress(&mut self) {
        if let Some(since) = self.since.take() {
            log::info!(
                "{}: answered again after {} retries in {} ms",
                self.what,
                self.retries,
                since.elapsed().as_millis()
            );
            self.retries = 0;
            self.next_wait = BROKEN_FIRST_WAIT;
            self.first = None;
        }
    }

    /// After a failed attempt: `Ok` once it is time to make the request again, or the
    /// error to return — `e` itself unless its answer broke off (see
    /// [`broken_answer`]), a give-up error once the retries are spent.
    async fn after(
        &mut self,
        e: object_store::Error,
    ) -> std::result::Result<(), object_store::Error> {
        if !broken_answer(&e) {
            if self.since.is_some() {
                log::debug!("{}: not retried: {e}", self.what);
            }
            return Err(e);
        }
        let since = *self.since.get_or_insert_with(Instant::now);
        if self.first.is_none() {
            self.first = Some(e.to_string());
        }
        let spent = since.elapsed();
        if spent >= self.limit || self.retries >= MAX_RETRIES {
            let why = format!(
                "{e}; gave up after {} retries in {} s (retry time limit {} s)",
                self.retries,
                spent.as_secs(),
                self.limit.as_secs()
            );
            log::warn!("{}: {why}", self.what);
            return Err(object_store::Error::Generic {
                store: "S3",
                source: Box::new(GaveUp(why)),
            });
        }
        self.retries += 1;
        let wait = self.next_wait;
        self.next_wait = (wait * 2).min(MAX_BACKOFF);
        log::warn!(
            "{}: the answer broke off ({e}); retry {} of at most {MAX_RETRIES} in {} ms",
            self.what,
            self.retries,
            wait.as_millis()
        );
        tokio::time::sleep(wait).await;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use object_store::client::{HttpError, HttpErrorKind};
    use object_store::memory::InMemory;
    use object_store::{
        GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
        PutMultipartOptions, PutOptions, PutResult,
    };
    use std::io::{Read, Write};
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    /// The error of S3's listing whose body broke off ("Error getting list response
    /// body: …"): the transport error under one of `object_store`'s own.
    #[derive(Debug)]
    struct ListBody(HttpError);

    impl std::fmt::Display for ListBody {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "Error getting list response body: {}", self.0)
        }
    }

    impl std::error::Error for ListBody {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    fn http(kind: HttpErrorKind) -> HttpError {
        HttpError::new(
            kind,
            std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "request or response body error",
            ),
        )
    }

    fn broken() -> object_store::Error {
        object_store::Error::Generic {
            store: "S3",
            source: Box::new(ListBody(http(HttpErrorKind::Unknown))),
        }
    }

    pub(crate) fn denied() -> object_store::Error {
        object_store::Error::PermissionDenied {
            path: "p/x".into(),
            source: "403 Forbidden: AccessDenied".into(),
        }
    }

    /// An in-memory store whose reads fail on purpose: the next `left` GETs and
    /// listings fail with `fault` — a broken answer (`body`: a GET's body, a listing
    /// after `keys_first` keys) or an error in place of an answer; a listing's after
    /// `list_delay` — and, with `hang`, every GET after the first fault never answers.
    #[derive(Debug)]
    pub(crate) struct Flaky {
        inner: InMemory,
        pub(crate) left: AtomicUsize,
        fault: fn() -> object_store::Error,
        pub(crate) body: bool,
        keys_first: usize,
        pub(crate) list_delay: Duration,
        hang: bool,
        pub(crate) reads: AtomicUsize,
    }

    impl std::fmt::Display for Flaky {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "Flaky({})", self.inner)
        }
    }

    impl Flaky {
        pub(crate) fn new(left: usize, fault: fn() -> object_store::Error) -> Flaky {
            Flaky {
                inner: InMemory::new(),
                left: AtomicUsize::new(left),
                fault,
                body: true,
                keys_first: 0,
                list_delay: Duration::ZERO,
                hang: false,
                reads: AtomicUsize::new(0),
            }
        }

        /// Counts a read; whether it fails.
        fn read_fails(&self) -> bool {
            self.reads.fetch_add(1, Ordering::SeqCst);
            self.left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        }

        fn flaky_list(
            &self,
            fails: bool,
            keys: futures_util::stream::BoxStream<'static, object_store::Result<ObjectMeta>>,
        ) -> futures_util::stream::BoxStream<'static, object_store::Result<ObjectMeta>> {
            if !fails {
                return keys;
            }
            let first = if self.body { self.keys_first } else { 0 };
            let (fault, delay) = (self.fault, self.list_delay);
            keys.take(first)
                .chain(futures_util::stream::once(async move {
                    tokio::time::sleep(delay).await;
                    Err(fault())
                }))
                .boxed()
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for Flaky {
        async fn put_opts(
            &self,
            location: &Key,
            payload: PutPayload,
            opts: PutOptions,
        ) -> object_store::Result<PutResult> {
            self.inner.put_opts(location, payload, opts).await
        }

        async fn put_multipart_opts(
            &self,
            location: &Key,
            opts: PutMultipartOptions,
        ) -> object_store::Result<Box<dyn MultipartUpload>> {
            self.inner.put_multipart_opts(location, opts).await
        }

        async fn get_opts(
            &self,
            location: &Key,
            options: GetOptions,
        ) -> object_store::Result<GetResult> {
            let hung = self.hang && self.reads.load(Ordering::SeqCst) > 0;
            let fails = self.read_fails();
            if hung {
                return std::future::pending().await;
            }
            if fails && !self.body {
                return Err((self.fault)());
            }
            let mut r = self.inner.get_opts(location, options).await?;
            if fails {
                let fault = self.fault;
                r.payload = GetResultPayload::Stream(
                    futures_util::stream::once(async move { Err(fault()) }).boxed(),
                );
            }
            Ok(r)
        }

        async fn delete(&self, location: &Key) -> object_store::Result<()> {
            self.inner.delete(location).await
        }

        fn list(
            &self,
            prefix: Option<&Key>,
        ) -> futures_util::stream::BoxStream<'static, object_store::Result<ObjectMeta>> {
            let fails = self.read_fails();
            self.flaky_list(fails, self.inner.list(prefix))
        }

        fn list_with_offset(
            &self,
            prefix: Option<&Key>,
            offset: &Key,
        ) -> futures_util::stream::BoxStream<'static, object_store::Result<ObjectMeta>> {
            let fails = self.read_fails();
            self.flaky_list(fails, self.inner.list_with_offset(prefix, offset))
        }

        async fn list_with_delimiter(
            &self,
            prefix: Option<&Key>,
        ) -> object_store::Result<ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }

        async fn copy(&self, from: &Key, to: &Key) -> object_store::Result<()> {
            self.inner.copy(from, to).await
        }

        async fn copy_if_not_exists(&self, from: &Key, to: &Key) -> object_store::Result<()> {
            self.inner.copy_if_not_exists(from, to).await
        }
    }

    /// A repository on `store` (kept for its counts) that retries broken answers for
    /// `limit`.
    pub(crate) fn flaky_repo(store: Flaky, limit: Duration) -> (ObjectRepo, Arc<Flaky>) {
        let store = Arc::new(store);
        let r = ObjectRepo::with_store(
            "s3://mem/p",
            "p",
            Box::new(Arc::clone(&store) as Arc<dyn ObjectStore>),
        )
        .unwrap()
        .with_retry_timeout(limit);
        (r, store)
    }

    #[test]
    fn broken_answers_and_only_they_are_retried() {
        assert!(broken_answer(&broken()));
        for kind in [
            HttpErrorKind::Connect,
            HttpErrorKind::Request,
            HttpErrorKind::Timeout,
            HttpErrorKind::Interrupted,
        ] {
            let e = object_store::Error::Generic {
                store: "S3",
                source: Box::new(http(kind)),
            };
            assert!(broken_answer(&e), "{kind:?}");
        }
        // A GET's body retried within object_store: its error wraps the broken one.
        let nested = object_store::Error::Generic {
            store: "S3",
            source: Box::new(broken()),
        };
        assert!(broken_answer(&nested));
        let decode = object_store::Error::Generic {
            store: "S3",
            source: Box::new(http(HttpErrorKind::Decode)),
        };
        let plain = object_store::Error::Generic {
            store: "S3",
            source: "Server returned non-2xx status code: 400 Bad Request".into(),
        };
        let not_found = object_store::Error::NotFound {
            path: "p/x".into(),
            source: Box::new(http(HttpErrorKind::Interrupted)),
        };
        let nested_not_found = object_store::Error::Generic {
            store: "S3",
            source: Box::new(object_store::Error::NotFound {
                path: "p/x".into(),
                source: Box::new(http(HttpErrorKind::Interrupted)),
            }),
        };
        for e in [decode, plain, not_found, nested_not_found, denied()] {
            assert!(!broken_answer(&e), "{e}");
        }
    }

    #[test]
    fn a_broken_get_is_read_again() {
        let (r, store) = flaky_repo(Flaky::new(2, broken), Duration::from_secs(10));
        r.put("a", b"hello".to_vec()).unwrap();
        let t = Instant::now();
        assert_eq!(r.get("a").unwrap().as_deref(), Some(&b"hello"[..]));
        assert_eq!(store.reads.load(Ordering::SeqCst), 3);
        // Waits of 0.5 s and 1 s.
        assert!(
            t.elapsed() >= Duration::from_millis(1400),
            "{:?}",
            t.elapsed()
        );
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }

    #[test]
    fn a_broken_listing_resumes_after_its_last_key() {
        let mut f = Flaky::new(3, broken);
        f.keys_first = 1;
        let (r, store) = flaky_repo(f, Duration::from_secs(10));
        for i in 0..5 {
            r.put(&format!("chunks/k{i}"), vec![i as u8; i + 1])
                .unwrap();
        }
        r.put("other", Vec::new()).unwrap();
        let listed = r.list("chunks/").unwrap();
        let want: Vec<(String, u64)> = (0..5)
            .map(|i| (format!("chunks/k{i}"), i as u64 + 1))
            .collect();
        assert_eq!(listed, want);
        // Three broken listings (each after one key) and the one that ended.
        assert_eq!(store.reads.load(Ordering::SeqCst), 4);
        // A page of a listing after a key: resumed there too, up to its size.
        store.left.store(1, Ordering::SeqCst);
        let page = r.list_page("chunks/", Some("chunks/k0"), 3).unwrap();
        let names: Vec<&str> = page.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["chunks/k1", "chunks/k2", "chunks/k3"]);
    }

    #[test]
    fn a_store_that_stays_broken_fails_within_the_limit() {
        let limit = Duration::from_secs(3);
        let (r, store) = flaky_repo(Flaky::new(usize::MAX, broken), limit);
        r.put("chunks/k", b"x".to_vec()).unwrap();
        for what in ["list", "get"] {
            let t = Instant::now();
            let reads = store.reads.load(Ordering::SeqCst);
            let e = match what {
                "list" => r.list("chunks/").unwrap_err(),
                _ => r.get("chunks/k").unwrap_err(),
            };
            let took = t.elapsed();
            // Waits of 0.5, 1 and 2 s; the fourth failure comes after the limit.
            assert!(took >= limit, "{what}: {took:?}");
            assert!(took < limit + Duration::from_secs(1), "{what}: {took:?}");
            assert_eq!(store.reads.load(Ordering::SeqCst) - reads, 4, "{what}");
            let msg = e.to_string();
            assert!(msg.contains("gave up after 3 retries"), "{msg}");
            assert!(msg.contains("s3://mem/p/chunks/"), "{msg}");
        }
    }

    #[test]
    fn a_retried_read_that_does_not_answer_is_cut_off_at_the_deadline() {
        // The limit plus as long again (the last wait, the limit being short).
        let limit = Duration::from_secs(1);
        let mut f = Flaky::new(1, broken);
        f.hang = true;
        let (r, store) = flaky_repo(f, limit);
        r.put("a", b"x".to_vec()).unwrap();
        let t = Instant::now();
        let e = r.get("a").unwrap_err();
        let took = t.elapsed();
        assert!(took >= 2 * limit, "{took:?}");
        assert!(took < 2 * limit + Duration::from_millis(500), "{took:?}");
        assert_eq!(store.reads.load(Ordering::SeqCst), 2);
        let msg = e.to_string();
        assert!(
            msg.contains("no complete answer") && msg.contains("1 retries"),
            "{msg}"
        );
    }

    #[test]
    fn definite_answers_are_not_retried() {
        // Not found: at once, one request.
        let (r, store) = flaky_repo(Flaky::new(0, broken), Duration::from_secs(10));
        let t = Instant::now();
        assert_eq!(r.get("none").unwrap(), None);
        assert_eq!(store.reads.load(Ordering::SeqCst), 1);
        // Access denied, in place of an answer (GET, listing) or as a GET's body.
        for body in [false, true] {
            let mut f = Flaky::new(usize::MAX, denied);
            f.body = body;
            let (r, store) = flaky_repo(f, Duration::from_secs(10));
            r.put("chunks/a", b"x".to_vec()).unwrap();
            let e = r.get("chunks/a").unwrap_err();
            assert!(e.to_string().contains("AccessDenied"), "{e}");
            let e = r.list("chunks/").unwrap_err();
            assert!(e.to_string().contains("AccessDenied"), "{e}");
            assert_eq!(store.reads.load(Ordering::SeqCst), 2);
        }
        assert!(
            t.elapsed() < Duration::from_millis(400),
            "{:?}",
            t.elapsed()
        );
    }

    /// An S3 client of `object_store` (no retries of its own beyond one) on a local
    /// endpoint.
    fn s3_repo(endpoint: &str, limit: Duration) -> ObjectRepo {
        let store = AmazonS3Builder::new()
            .with_endpoint(endpoint)
            .with_allow_http(true)
            .with_bucket_name("bkt")
            .with_region("us-east-1")
            .with_access_key_id("k")
            .with_secret_access_key("s")
            .with_virtual_hosted_style_request(false)
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(10),
                    max_backoff: Duration::from_millis(10),
                    base: 2.0,
                },
                max_retries: 1,
                retry_timeout: Duration::from_secs(1),
            })
            .build()
            .unwrap();
        ObjectRepo::with_store("s3://bkt/p", "p", Box::new(store))
            .unwrap()
            .with_retry_timeout(limit)
    }

    #[test]
    fn a_request_whose_own_retries_are_spent_is_not_retried_again() {
        // A port nobody listens on: connections refused, retried by object_store
        // (once), then its error: not a broken answer, so no retries of ours.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let r = s3_repo(&format!("http://127.0.0.1:{port}"), Duration::from_secs(10));
        let t = Instant::now();
        let e = r.get("a").unwrap_err();
        assert!(!e.to_string().contains("gave up"), "{e}");
        let e = r.list("chunks/").unwrap_err();
        assert!(!e.to_string().contains("gave up"), "{e}");
        assert!(
            t.elapsed() < Duration::from_millis(400),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn a_real_s3_listing_cut_off_mid_body_is_made_again() {
        // A server that breaks off its first answer to a listing half-way (closes the
        // connection after part of the body it announced), then answers in full.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let body = concat!(
            r#"<?xml version="1.0" encoding="UTF-8"?>"#,
            r#"<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">"#,
            "<Name>bkt</Name><Prefix>p/chunks/</Prefix><KeyCount>1</KeyCount>",
            "<MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated>",
            "<Contents><Key>p/chunks/ab/x</Key><LastModified>2024-01-02T03:04:05.000Z",
            r#"</LastModified><ETag>"e"</ETag><Size>5</Size></Contents>"#,
            "</ListBucketResult>"
        );
        let server = std::thread::spawn(move || {
            for answer in 0..2 {
                let (mut c, _) = listener.accept().unwrap();
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = c.read(&mut buf).unwrap();
                    assert!(n > 0);
                    req.extend_from_slice(&buf[..n]);
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                c.write_all(head.as_bytes()).unwrap();
                let sent = if answer == 0 {
                    body.len() / 2
                } else {
                    body.len()
                };
                c.write_all(&body.as_bytes()[..sent]).unwrap();
                c.flush().unwrap();
            }
        });
        let r = s3_repo(&format!("http://{addr}"), Duration::from_secs(10));
        let listed = r.list_meta("chunks/").unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].name, "chunks/ab/x");
        assert_eq!(listed[0].size, 5);
        server.join().unwrap();
    }

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
