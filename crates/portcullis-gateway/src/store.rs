//! The store as the gateway sees it.

use std::time::Duration;

use portcullis_store::{Rate, RateDecision, Result, Store, StoreError, WindowCount};

/// Stands in for the store in `check` and `routes`, which validate without opening it.
pub struct Unopened;

fn unopened<T>() -> Result<T> {
    Err(StoreError::Unavailable(
        "the store is not opened in this mode".into(),
    ))
}

#[async_trait::async_trait]
impl Store for Unopened {
    async fn get(&self, _: &str) -> Result<Option<Vec<u8>>> {
        unopened()
    }
    async fn set(&self, _: &str, _: &[u8], _: Option<Duration>) -> Result<()> {
        unopened()
    }
    async fn set_nx(&self, _: &str, _: &[u8], _: Option<Duration>) -> Result<bool> {
        unopened()
    }
    async fn delete(&self, _: &str) -> Result<bool> {
        unopened()
    }
    async fn take(&self, _: &str) -> Result<Option<Vec<u8>>> {
        unopened()
    }
    async fn touch(&self, _: &str, _: Duration) -> Result<bool> {
        unopened()
    }
    async fn scan_prefix(&self, _: &str, _: usize) -> Result<Vec<(String, Vec<u8>)>> {
        unopened()
    }
    async fn consume_window(&self, _: &str, _: u64, _: u64, _: Duration) -> Result<WindowCount> {
        unopened()
    }
    async fn compare_and_set(
        &self,
        _: &str,
        _: &[u8],
        _: &[u8],
        _: Option<Duration>,
    ) -> Result<bool> {
        unopened()
    }
    async fn compare_and_delete(&self, _: &str, _: &[u8]) -> Result<bool> {
        unopened()
    }
    async fn rate_limit(&self, _: &str, _: &Rate, _: u64) -> Result<RateDecision> {
        unopened()
    }
    async fn ping(&self) -> Result<()> {
        unopened()
    }
    fn unprefixed(&self) -> std::sync::Arc<dyn Store> {
        std::sync::Arc::new(Unopened)
    }
    fn backend_name(&self) -> &'static str {
        "unopened"
    }
}
