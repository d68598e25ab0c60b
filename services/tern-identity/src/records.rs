//! JSON records in the store, the form every identity record takes.

use serde::Serialize;
use serde::de::DeserializeOwned;
use tern_store::Store;

use crate::IdentityError;

pub(crate) async fn get<T: DeserializeOwned>(
    store: &dyn Store,
    kind: &str,
    key: &str,
) -> Result<Option<T>, IdentityError> {
    match store.get_record(kind, key).await? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| IdentityError::Keys(format!("corrupt {kind} record: {e}"))),
    }
}

/// A record and the bytes it was read from, so that [`replace`] writes over exactly that.
pub(crate) struct Versioned<T> {
    pub value: T,
    read: bytes::Bytes,
}

pub(crate) async fn get_versioned<T: DeserializeOwned>(
    store: &dyn Store,
    kind: &str,
    key: &str,
) -> Result<Option<Versioned<T>>, IdentityError> {
    match store.get_record(kind, key).await? {
        None => Ok(None),
        Some(read) => serde_json::from_slice(&read)
            .map(|value| Some(Versioned { value, read }))
            .map_err(|e| IdentityError::Keys(format!("corrupt {kind} record: {e}"))),
    }
}

/// Writes `value` only if the record is still what `read` saw; returns whether it did (false:
/// someone changed it meanwhile, in this process or another).
pub(crate) async fn replace<T: Serialize, R>(
    store: &dyn Store,
    kind: &str,
    key: &str,
    read: &Versioned<R>,
    value: &T,
) -> Result<bool, IdentityError> {
    Ok(store
        .compare_and_swap(kind, key, Some(read.read.clone()), Some(to_bytes(value)))
        .await?)
}

/// Deletes the record only if it is still what `read` saw; returns whether it did.
pub(crate) async fn remove<R>(
    store: &dyn Store,
    kind: &str,
    key: &str,
    read: &Versioned<R>,
) -> Result<bool, IdentityError> {
    Ok(store
        .compare_and_swap(kind, key, Some(read.read.clone()), None)
        .await?)
}

pub(crate) async fn put<T: Serialize>(
    store: &dyn Store,
    kind: &str,
    key: &str,
    value: &T,
) -> Result<(), IdentityError> {
    store.put_record(kind, key, to_bytes(value)).await?;
    Ok(())
}

/// Every record of `kind` under `prefix`, in key order.
pub(crate) async fn list<T: DeserializeOwned>(
    store: &dyn Store,
    kind: &str,
    prefix: &str,
) -> Result<Vec<(String, T)>, IdentityError> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store
            .list_records(kind, prefix, after.as_deref(), 500)
            .await?;
        let Some((last, _)) = page.last() else {
            return Ok(out);
        };
        after = Some(last.clone());
        for (key, bytes) in page {
            let value = serde_json::from_slice(&bytes)
                .map_err(|e| IdentityError::Keys(format!("corrupt {kind} record: {e}")))?;
            out.push((key, value));
        }
    }
}

pub(crate) fn to_bytes<T: Serialize>(value: &T) -> bytes::Bytes {
    serde_json::to_vec(value).unwrap_or_default().into()
}
