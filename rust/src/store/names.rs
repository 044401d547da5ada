//! Keys and names inside a store, checked before use, and the errors that name the store.

use zarrs::storage::{StoreKey, StorePrefix};

use crate::error::{Error, Result};
use crate::location::Location;

/// An I/O error at `root` (the store, or a file of it).
pub(super) fn io_err(root: &impl std::fmt::Display, e: impl std::fmt::Display) -> Error {
    Error::Io(format!("{root}: {e}"))
}

pub(super) fn exists_err(location: &Location) -> Error {
    Error::Exists(format!(
        "{location}: already exists (pass overwrite=True to replace it)"
    ))
}

pub(super) fn key(text: &str) -> Result<StoreKey> {
    StoreKey::new(text).map_err(|e| Error::Invalid(format!("invalid store key {text:?}: {e}")))
}

pub(super) fn prefix(text: &str) -> Result<StorePrefix> {
    StorePrefix::new(text)
        .map_err(|e| Error::Invalid(format!("invalid store prefix {text:?}: {e}")))
}

/// A file of the group that is no array: a plain name (no folder), not the group's metadata.
pub(super) fn check_extra(name: &str) -> Result<()> {
    if name.is_empty() || name.contains(['/', '\\']) || name == "zarr.json" || name == ".zgroup" {
        return Err(Error::Invalid(format!("invalid store file name {name:?}")));
    }
    Ok(())
}

pub(super) fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && !name.starts_with("__")
        && !name.contains(['/', '\\'])
        && name != "zarr.json";
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!("invalid array name {name:?}")))
    }
}
