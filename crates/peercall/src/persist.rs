//! The state writer: one task that writes state files into the data directory, in
//! the order asked, off the engine task (an `fsync` can take long on a busy disk,
//! and the engine must keep answering packets meanwhile).
//!
//! Writes are atomic (`DataDir::write`). Each file's writes are serialised by the
//! single task, so two saves of one file never race on its temporary file.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::warn;

use crate::metrics::Metrics;
use crate::store::DataDir;

/// Writes queued before more are refused: saves come every few seconds at most,
/// so a full queue means the disk is stuck, and piling up more would not help.
const QUEUE: usize = 16;

/// Whether a save reached the disk, and if not, why.
pub type Saved = Result<(), String>;

#[derive(Debug)]
struct Job {
    name: &'static str,
    bytes: Vec<u8>,
    done: Option<oneshot::Sender<Saved>>,
}

/// A handle to the writer task.
#[derive(Debug)]
pub struct Persister {
    tx: mpsc::Sender<Job>,
    task: JoinHandle<()>,
}

impl Persister {
    /// Starts the writer task over `dir`.
    pub fn start(dir: Arc<DataDir>, metrics: Arc<Metrics>) -> Persister {
        let (tx, mut rx) = mpsc::channel::<Job>(QUEUE);
        let task = tokio::spawn(async move {
            while let Some(job) = rx.recv().await {
                let dir = dir.clone();
                let Job { name, bytes, done } = job;
                let result = tokio::task::spawn_blocking(move || dir.write(name, &bytes))
                    .await
                    .map_err(|e| format!("the writer failed: {e}"))
                    .and_then(|r| r.map_err(|e| e.to_string()));
                if let Err(e) = &result {
                    metrics.state_save_failed(name);
                    warn!(file = name, error = %e, "could not save state");
                }
                if let Some(done) = done {
                    let _ = done.send(result);
                }
            }
        });
        Persister { tx, task }
    }

    /// Queues a write of `name`; the returned receiver says whether it reached the
    /// disk (dropping it is fine: failures are logged and counted either way).
    pub fn save(&self, name: &'static str, bytes: Vec<u8>) -> oneshot::Receiver<Saved> {
        let (done, rx) = oneshot::channel();
        let job = Job {
            name,
            bytes,
            done: Some(done),
        };
        if let Err(e) = self.tx.try_send(job) {
            let job = match e {
                mpsc::error::TrySendError::Full(j) | mpsc::error::TrySendError::Closed(j) => j,
            };
            warn!(file = name, "state writer busy or stopped; save skipped");
            if let Some(done) = job.done {
                let _ = done.send(Err("the state writer is busy (disk stuck?)".into()));
            }
        }
        rx
    }

    /// Finishes the queued writes and stops the task.
    pub async fn finish(self) {
        drop(self.tx);
        if let Err(e) = self.task.await {
            warn!(error = %e, "state writer failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peercall_wire::Time;

    #[tokio::test]
    async fn writes_in_order_and_confirms() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Arc::new(DataDir::open(tmp.path()).unwrap());
        let metrics = Arc::new(Metrics::new(Time::ZERO).unwrap());
        let p = Persister::start(dir.clone(), metrics);
        let first = p.save("a.json", b"1".to_vec());
        let second = p.save("a.json", b"22".to_vec());
        assert_eq!(first.await.unwrap(), Ok(()));
        assert_eq!(second.await.unwrap(), Ok(()));
        drop(p.save("b.json", b"3".to_vec()));
        p.finish().await;
        assert_eq!(dir.read_private("a.json", 10).unwrap().unwrap(), b"22");
        assert_eq!(dir.read_private("b.json", 10).unwrap().unwrap(), b"3");
    }
}
