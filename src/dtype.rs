//! Element types as torch, safetensors and DLPack name them.

use std::fmt;

/// An element type of a stored tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    Bool,
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F16,
    BF16,
    F32,
    F64,
    /// `torch.complex32` (two float16).
    C32,
    C64,
    C128,
    F8E4M3FN,
    F8E5M2,
    F8E4M3FNUZ,
    F8E5M2FNUZ,
    F8E8M0FNU,
}

/// DLPack type codes (dlpack.h `DLDataTypeCode`).
pub mod dl_code {
    pub const INT: u8 = 0;
    pub const UINT: u8 = 1;
    pub const FLOAT: u8 = 2;
    pub const BFLOAT: u8 = 4;
    pub const COMPLEX: u8 = 5;
    pub const BOOL: u8 = 6;
    pub const FLOAT8_E4M3FN: u8 = 10;
    pub const FLOAT8_E4M3FNUZ: u8 = 11;
    pub const FLOAT8_E5M2: u8 = 12;
    pub const FLOAT8_E5M2FNUZ: u8 = 13;
    pub const FLOAT8_E8M0FNU: u8 = 14;
}

impl DType {
    pub const ALL: [DType; 21] = [
        DType::Bool,
        DType::U8,
        DType::I8,
        DType::I16,
        DType::U16,
        DType::I32,
        DType::U32,
        DType::I64,
        DType::U64,
        DType::F16,
        DType::BF16,
        DType::F32,
        DType::F64,
        DType::C32,
        DType::C64,
        DType::C128,
        DType::F8E4M3FN,
        DType::F8E5M2,
        DType::F8E4M3FNUZ,
        DType::F8E5M2FNUZ,
        DType::F8E8M0FNU,
    ];

    /// Bytes per element.
    pub const fn size(self) -> usize {
        use DType::*;
        match self {
            Bool | U8 | I8 | F8E4M3FN | F8E5M2 | F8E4M3FNUZ | F8E5M2FNUZ | F8E8M0FNU => 1,
            I16 | U16 | F16 | BF16 => 2,
            I32 | U32 | F32 | C32 => 4,
            I64 | U64 | F64 | C64 => 8,
            C128 => 16,
        }
    }

    /// The attribute name in the `torch` module (`torch.float32` -> "float32").
    pub const fn torch_name(self) -> &'static str {
        use DType::*;
        match self {
            Bool => "bool",
            U8 => "uint8",
            I8 => "int8",
            I16 => "int16",
            U16 => "uint16",
            I32 => "int32",
            U32 => "uint32",
            I64 => "int64",
            U64 => "uint64",
            F16 => "float16",
            BF16 => "bfloat16",
            F32 => "float32",
            F64 => "float64",
            C32 => "complex32",
            C64 => "complex64",
            C128 => "complex128",
            F8E4M3FN => "float8_e4m3fn",
            F8E5M2 => "float8_e5m2",
            F8E4M3FNUZ => "float8_e4m3fnuz",
            F8E5M2FNUZ => "float8_e5m2fnuz",
            F8E8M0FNU => "float8_e8m0fnu",
        }
    }

    pub fn from_torch_name(name: &str) -> Option<DType> {
        let name = name.strip_prefix("torch.").unwrap_or(name);
        let alias = match name {
            "float" => Some(DType::F32),
            "double" => Some(DType::F64),
            "half" => Some(DType::F16),
            "long" => Some(DType::I64),
            "int" => Some(DType::I32),
            "short" => Some(DType::I16),
            "cfloat" => Some(DType::C64),
            "cdouble" => Some(DType::C128),
            "chalf" => Some(DType::C32),
            _ => None,
        };
        alias.or_else(|| DType::ALL.into_iter().find(|d| d.torch_name() == name))
    }

    /// The dtype of a legacy typed storage class (`torch.FloatStorage` -> F32).
    pub fn from_storage_class(name: &str) -> Option<DType> {
        use DType::*;
        Some(match name {
            "BoolStorage" => Bool,
            "ByteStorage" => U8,
            "CharStorage" => I8,
            "ShortStorage" => I16,
            "IntStorage" => I32,
            "LongStorage" => I64,
            "HalfStorage" => F16,
            "BFloat16Storage" => BF16,
            "FloatStorage" => F32,
            "DoubleStorage" => F64,
            "ComplexHalfStorage" => C32,
            "ComplexFloatStorage" => C64,
            "ComplexDoubleStorage" => C128,
            "Float8_e4m3fnStorage" => F8E4M3FN,
            "Float8_e5m2Storage" => F8E5M2,
            "Float8_e4m3fnuzStorage" => F8E4M3FNUZ,
            "Float8_e5m2fnuzStorage" => F8E5M2FNUZ,
            "UInt16Storage" => U16,
            "UInt32Storage" => U32,
            "UInt64Storage" => U64,
            _ => return None,
        })
    }

    /// The dtype string in a safetensors header.
    pub const fn safetensors_name(self) -> &'static str {
        use DType::*;
        match self {
            Bool => "BOOL",
            U8 => "U8",
            I8 => "I8",
            I16 => "I16",
            U16 => "U16",
            I32 => "I32",
            U32 => "U32",
            I64 => "I64",
            U64 => "U64",
            F16 => "F16",
            BF16 => "BF16",
            F32 => "F32",
            F64 => "F64",
            C32 => "C32",
            C64 => "C64",
            C128 => "C128",
            F8E4M3FN => "F8_E4M3",
            F8E5M2 => "F8_E5M2",
            F8E4M3FNUZ => "F8_E4M3FNUZ",
            F8E5M2FNUZ => "F8_E5M2FNUZ",
            F8E8M0FNU => "F8_E8M0",
        }
    }

    /// From the `safetensors` crate's dtype. `None` for types torch cannot hold.
    pub fn from_safetensors(d: safetensors::Dtype) -> Option<DType> {
        use safetensors::Dtype as S;
        Some(match d {
            S::BOOL => DType::Bool,
            S::U8 => DType::U8,
            S::I8 => DType::I8,
            S::I16 => DType::I16,
            S::U16 => DType::U16,
            S::I32 => DType::I32,
            S::U32 => DType::U32,
            S::I64 => DType::I64,
            S::U64 => DType::U64,
            S::F16 => DType::F16,
            S::BF16 => DType::BF16,
            S::F32 => DType::F32,
            S::F64 => DType::F64,
            S::C64 => DType::C64,
            S::F8_E4M3 => DType::F8E4M3FN,
            S::F8_E5M2 => DType::F8E5M2,
            S::F8_E8M0 => DType::F8E8M0FNU,
            _ => return None,
        })
    }

    /// DLPack `(code, bits, lanes)`.
    pub const fn dlpack(self) -> (u8, u8, u16) {
        use dl_code::*;
        use DType::*;
        let code = match self {
            Bool => BOOL,
            U8 | U16 | U32 | U64 => UINT,
            I8 | I16 | I32 | I64 => INT,
            F16 | F32 | F64 => FLOAT,
            BF16 => BFLOAT,
            C32 | C64 | C128 => COMPLEX,
            F8E4M3FN => FLOAT8_E4M3FN,
            F8E5M2 => FLOAT8_E5M2,
            F8E4M3FNUZ => FLOAT8_E4M3FNUZ,
            F8E5M2FNUZ => FLOAT8_E5M2FNUZ,
            F8E8M0FNU => FLOAT8_E8M0FNU,
        };
        (code, (self.size() * 8) as u8, 1)
    }

    /// Floating point (real or complex): what `dtype=` casts apply to.
    pub const fn is_floating_point(self) -> bool {
        use DType::*;
        matches!(
            self,
            F16 | BF16 | F32 | F64 | F8E4M3FN | F8E5M2 | F8E4M3FNUZ | F8E5M2FNUZ | F8E8M0FNU
        )
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "torch.{}", self.torch_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torch_names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_torch_name(d.torch_name()), Some(d));
        }
        assert_eq!(DType::from_torch_name("torch.float"), Some(DType::F32));
    }

    #[test]
    fn dlpack_bits_match_size() {
        for d in DType::ALL {
            assert_eq!(d.dlpack().1 as usize, d.size() * 8);
        }
    }
}
