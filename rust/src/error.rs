//! One error type for the store; each variant maps to a Python exception class by `kind()`.

/// A store failure. Messages already name the store path and the array.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Exists(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Incomplete(String),
    #[error("{0}")]
    Corrupt(String),
    #[error("{0}")]
    DType(String),
    #[error("{0}")]
    Index(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Io(String),
}

impl Error {
    /// Stable name of the variant, used by the Python wrapper to pick the exception class.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Exists(_) => "exists",
            Error::NotFound(_) => "not_found",
            Error::Incomplete(_) => "incomplete",
            Error::Corrupt(_) => "corrupt",
            Error::DType(_) => "dtype",
            Error::Index(_) => "index",
            Error::Invalid(_) => "invalid",
            Error::Io(_) => "io",
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
