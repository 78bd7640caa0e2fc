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
    /// `torch.float4_e2m1fn_x2`: two 4-bit floats packed in each byte, so one torch
    /// element per byte. safetensors calls it `F4` and counts the 4-bit values: its shape
    /// has twice torch's last dimension.
    F4E2M1FNX2,
    /// `torch.bits8`, `bits16`, `bits1x8`, `bits2x4`, `bits4x2`: opaque bit containers
    /// (no arithmetic), which `torch.save` writes and DLPack cannot carry.
    Bits8,
    Bits16,
    Bits1x8,
    Bits2x4,
    Bits4x2,
    /// `torch.bcomplex32` (two bfloat16), which DLPack cannot carry.
    BC32,
}

/// How each dtype a safetensors header can name maps to torch: `(header name, bits per
/// value, torch dtype)`. `None`: torch has no dtype for it (6-bit floats), so such a
/// tensor is listed but cannot be loaded. A name missing here is unknown to zeroload.
pub const SAFETENSORS_DTYPES: [(&str, u64, Option<DType>); 22] = [
    ("BOOL", 8, Some(DType::Bool)),
    ("F4", 4, Some(DType::F4E2M1FNX2)),
    ("F6_E2M3", 6, None),
    ("F6_E3M2", 6, None),
    ("U8", 8, Some(DType::U8)),
    ("I8", 8, Some(DType::I8)),
    ("F8_E5M2", 8, Some(DType::F8E5M2)),
    ("F8_E4M3", 8, Some(DType::F8E4M3FN)),
    ("F8_E8M0", 8, Some(DType::F8E8M0FNU)),
    ("F8_E4M3FNUZ", 8, Some(DType::F8E4M3FNUZ)),
    ("F8_E5M2FNUZ", 8, Some(DType::F8E5M2FNUZ)),
    ("I16", 16, Some(DType::I16)),
    ("U16", 16, Some(DType::U16)),
    ("F16", 16, Some(DType::F16)),
    ("BF16", 16, Some(DType::BF16)),
    ("I32", 32, Some(DType::I32)),
    ("U32", 32, Some(DType::U32)),
    ("F32", 32, Some(DType::F32)),
    ("C64", 64, Some(DType::C64)),
    ("F64", 64, Some(DType::F64)),
    ("I64", 64, Some(DType::I64)),
    ("U64", 64, Some(DType::U64)),
];

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
    pub const FLOAT4_E2M1FN: u8 = 17;
}

impl DType {
    pub const ALL: [DType; 28] = [
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
        DType::F4E2M1FNX2,
        DType::Bits8,
        DType::Bits16,
        DType::Bits1x8,
        DType::Bits2x4,
        DType::Bits4x2,
        DType::BC32,
    ];

    /// Bytes per element (per torch element: a `float4_e2m1fn_x2` element is a byte).
    pub const fn size(self) -> usize {
        use DType::*;
        match self {
            Bool | U8 | I8 | F8E4M3FN | F8E5M2 | F8E4M3FNUZ | F8E5M2FNUZ | F8E8M0FNU => 1,
            F4E2M1FNX2 | Bits8 | Bits1x8 | Bits2x4 | Bits4x2 => 1,
            I16 | U16 | F16 | BF16 | Bits16 => 2,
            I32 | U32 | F32 | C32 | BC32 => 4,
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
            F4E2M1FNX2 => "float4_e2m1fn_x2",
            Bits8 => "bits8",
            Bits16 => "bits16",
            Bits1x8 => "bits1x8",
            Bits2x4 => "bits2x4",
            Bits4x2 => "bits4x2",
            BC32 => "bcomplex32",
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

    /// The dtype string in a safetensors header. Types the safetensors format lacks get
    /// the names zeroload has always given them (`C32`, `C128`), or `None` (bits types,
    /// bcomplex32).
    pub const fn safetensors_name(self) -> Option<&'static str> {
        use DType::*;
        Some(match self {
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
            F4E2M1FNX2 => "F4",
            Bits8 | Bits16 | Bits1x8 | Bits2x4 | Bits4x2 | BC32 => return None,
        })
    }

    /// `(bits per value, torch dtype or None)` of a safetensors header's dtype name;
    /// `None` for a name zeroload does not know.
    pub fn from_safetensors_name(name: &str) -> Option<(u64, Option<DType>)> {
        SAFETENSORS_DTYPES
            .iter()
            .find(|(n, _, _)| *n == name)
            .map(|&(_, bits, d)| (bits, d))
    }

    /// How many values of the safetensors type share one torch element (2 for the packed
    /// 4-bit float, whose torch shape has half safetensors' last dimension).
    pub const fn values_per_element(self) -> u64 {
        match self {
            DType::F4E2M1FNX2 => 2,
            _ => 1,
        }
    }

    /// DLPack `(code, bits, lanes)`, as torch exports the type (the packed 4-bit float is
    /// two 4-bit lanes per element); `None` for types DLPack cannot carry (bits types,
    /// bcomplex32).
    pub const fn dlpack(self) -> Option<(u8, u8, u16)> {
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
            F4E2M1FNX2 => return Some((FLOAT4_E2M1FN, 4, 2)),
            Bits8 | Bits16 | Bits1x8 | Bits2x4 | Bits4x2 | BC32 => return None,
        };
        Some((code, (self.size() * 8) as u8, 1))
    }

    /// Floating point (real or complex): what `dtype=` casts apply to.
    pub const fn is_floating_point(self) -> bool {
        use DType::*;
        matches!(
            self,
            F16 | BF16
                | F32
                | F64
                | F8E4M3FN
                | F8E5M2
                | F8E4M3FNUZ
                | F8E5M2FNUZ
                | F8E8M0FNU
                | F4E2M1FNX2
        )
    }

    /// Complex (torch's `is_complex()`).
    pub const fn is_complex(self) -> bool {
        matches!(self, DType::C32 | DType::C64 | DType::C128 | DType::BC32)
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
            if let Some((_, bits, lanes)) = d.dlpack() {
                assert_eq!(bits as usize * lanes as usize, d.size() * 8, "{d}");
            }
        }
    }

    #[test]
    fn safetensors_names_round_trip() {
        for (name, bits, d) in SAFETENSORS_DTYPES {
            assert_eq!(DType::from_safetensors_name(name), Some((bits, d)));
            if let Some(d) = d {
                assert_eq!(d.safetensors_name(), Some(name));
                assert_eq!(bits * d.values_per_element(), d.size() as u64 * 8, "{name}");
            }
        }
        assert_eq!(DType::from_safetensors_name("F32 "), None);
    }
}
