//! The element types a store holds: fixed-size numbers, named as in both NumPy and Zarr v3.

use crate::error::Error;

/// A fixed-size element type. Its name is the same in NumPy (`dtype.name`) and Zarr v3 (`data_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    Bool,
    Int8,
    Int16,
    Int32,
    Int64,
    UInt8,
    UInt16,
    UInt32,
    UInt64,
    Float16,
    Float32,
    Float64,
}

const TABLE: [(DType, &str, usize); 12] = [
    (DType::Bool, "bool", 1),
    (DType::Int8, "int8", 1),
    (DType::Int16, "int16", 2),
    (DType::Int32, "int32", 4),
    (DType::Int64, "int64", 8),
    (DType::UInt8, "uint8", 1),
    (DType::UInt16, "uint16", 2),
    (DType::UInt32, "uint32", 4),
    (DType::UInt64, "uint64", 8),
    (DType::Float16, "float16", 2),
    (DType::Float32, "float32", 4),
    (DType::Float64, "float64", 8),
];

impl DType {
    /// Parse a NumPy / Zarr v3 name; bfloat16, strings and the like are refused.
    pub fn from_name(name: &str) -> Result<Self, Error> {
        TABLE
            .iter()
            .find(|(_, n, _)| *n == name)
            .map(|(d, _, _)| *d)
            .ok_or_else(|| {
                Error::DType(format!(
                    "unsupported dtype '{name}' (supported: {})",
                    TABLE.iter().map(|t| t.1).collect::<Vec<_>>().join(", ")
                ))
            })
    }

    pub fn name(self) -> &'static str {
        TABLE
            .iter()
            .find(|t| t.0 == self)
            .map(|t| t.1)
            .unwrap_or("?")
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        TABLE.iter().find(|t| t.0 == self).map(|t| t.2).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for (d, n, s) in TABLE {
            assert_eq!(DType::from_name(n).unwrap(), d);
            assert_eq!(d.name(), n);
            assert_eq!(d.size(), s);
        }
    }

    #[test]
    fn refuses_bfloat16() {
        assert!(matches!(DType::from_name("bfloat16"), Err(Error::DType(_))));
    }
}
