//! The NBD server: accepts connections on unix or TCP listeners and serves exports.
//! (Skeleton: the API is fixed; the protocol lands with the server.)

use cowsnap_core::export::Export;
use std::collections::BTreeMap;
use std::os::unix::net::UnixListener;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;

/// One named export.
#[derive(Clone)]
pub struct ExportEntry {
    /// What it serves.
    pub export: Arc<dyn Export>,
    /// Shown by NBD_OPT_LIST / NBD_INFO_DESCRIPTION.
    pub description: String,
}

/// A server with a table of exports; the export named "" is the default.
pub struct Server {
    exports: RwLock<BTreeMap<String, ExportEntry>>,
    shutdown: AtomicBool,
}

impl Server {
    /// An empty server.
    pub fn new() -> Arc<Self> {
        Arc::new(Server {
            exports: RwLock::new(BTreeMap::new()),
            shutdown: AtomicBool::new(false),
        })
    }
    /// Add or replace an export.
    pub fn set_export(&self, name: &str, export: Arc<dyn Export>, description: &str) {
        if let Ok(mut t) = self.exports.write() {
            t.insert(
                name.to_string(),
                ExportEntry {
                    export,
                    description: description.to_string(),
                },
            );
        }
    }
    /// Remove an export (new connections can no longer select it).
    pub fn remove_export(&self, name: &str) {
        if let Ok(mut t) = self.exports.write() {
            t.remove(name);
        }
    }
    /// Accept connections on a unix socket in a background thread.
    pub fn spawn_unix(self: &Arc<Self>, _listener: UnixListener) -> JoinHandle<()> {
        std::thread::spawn(|| {})
    }
    /// Accept connections on a TCP socket in a background thread.
    pub fn spawn_tcp(self: &Arc<Self>, _listener: TcpListener) -> JoinHandle<()> {
        std::thread::spawn(|| {})
    }
    /// Connections open now.
    pub fn connections(&self) -> usize {
        0
    }
    /// Stop accepting; connections finish their in-flight requests and close.
    pub fn shutdown(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
    }
}
