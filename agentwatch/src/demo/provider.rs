//! The demo's stand-in for a model provider: a real HTTP server on loopback that answers every
//! request and counts them, so the narration can say how many calls got through.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use anyhow::{Context as _, Result};
use axum::{Router, routing::any};
use tokio::{net::TcpListener, task::JoinHandle};

/// A running provider; stops when dropped.
pub struct Provider {
    pub addr: SocketAddr,
    served: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Provider {
    /// Serves on 127.0.0.1, on a port the kernel picks.
    pub async fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the demo model provider")?;
        let addr = listener.local_addr()?;
        let served = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&served);
        let app = Router::new().fallback(any(move || {
            let counter = Arc::clone(&counter);
            async move {
                counter.fetch_add(1, Ordering::Relaxed);
                "{\"completion\":\"ok\"}"
            }
        }));
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!("demo model provider stopped: {e}");
            }
        });
        Ok(Self { addr, served, task })
    }

    /// Requests answered so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.task.abort();
    }
}
