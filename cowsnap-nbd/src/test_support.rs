//! Set-up shared by the crate's unit tests.

use cowsnap_core::blockio::{self, IoEngine, OpenSpec};
use cowsnap_core::changelog::ChangeLog;
use cowsnap_core::engine::{Engine, EngineConfig};
use std::path::Path;
use std::sync::Arc;

/// An engine with the default configuration over a new file `origin` of `size` bytes,
/// each `fill` (0: a sparse file), through pread/pwrite (the same on every host),
/// tracking changes in `changelog` when one is given.
pub fn file_engine(
    origin: &Path,
    size: u64,
    fill: u8,
    changelog: Option<Arc<ChangeLog>>,
) -> Arc<Engine> {
    if fill == 0 {
        std::fs::File::create(origin)
            .unwrap()
            .set_len(size)
            .unwrap();
    } else {
        std::fs::write(origin, vec![fill; size as usize]).unwrap();
    }
    let io = blockio::open(&OpenSpec {
        engine: IoEngine::Sync,
        ..OpenSpec::origin(origin)
    })
    .unwrap();
    Engine::new(io, EngineConfig::default(), changelog).unwrap()
}
