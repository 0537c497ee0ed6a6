//! `Codec`: how the embedder's inputs and outputs become bytes in a snapshot and back.
//!
//! Owns nothing but two functions. Invariant expected of the embedder: `decode(encode(x))`
//! equals `x` for every value the stage can hold (checked by the stage's restore tests for
//! the codecs this crate ships).

use std::sync::Arc;

type EncodeFn<T> = Arc<dyn Fn(&T) -> Vec<u8> + Send + Sync>;
type DecodeFn<T> = Arc<dyn Fn(&[u8]) -> Result<T, String> + Send + Sync>;

/// A pair of functions between `T` and bytes. Cheap to clone.
pub struct Codec<T> {
    encode: EncodeFn<T>,
    decode: DecodeFn<T>,
}

impl<T> Clone for Codec<T> {
    fn clone(&self) -> Self {
        Codec {
            encode: self.encode.clone(),
            decode: self.decode.clone(),
        }
    }
}

impl<T> Codec<T> {
    /// A codec from its two halves; `decode` says what is wrong with bytes it refuses.
    pub fn new(
        encode: impl Fn(&T) -> Vec<u8> + Send + Sync + 'static,
        decode: impl Fn(&[u8]) -> Result<T, String> + Send + Sync + 'static,
    ) -> Self {
        Codec {
            encode: Arc::new(encode),
            decode: Arc::new(decode),
        }
    }

    pub fn encode(&self, value: &T) -> Vec<u8> {
        (self.encode)(value)
    }

    pub fn decode(&self, bytes: &[u8]) -> Result<T, String> {
        (self.decode)(bytes)
    }
}

impl<T: AsRef<[u8]> + From<Vec<u8>>> Codec<T> {
    /// For byte-like values (`Vec<u8>`, `String` is not: use [`Codec::utf8`]).
    pub fn bytes() -> Self {
        Codec::new(|v: &T| v.as_ref().to_vec(), |b| Ok(T::from(b.to_vec())))
    }
}

impl Codec<String> {
    /// UTF-8 text.
    pub fn utf8() -> Self {
        Codec::new(
            |s: &String| s.as_bytes().to_vec(),
            |b| String::from_utf8(b.to_vec()).map_err(|e| e.to_string()),
        )
    }
}

impl Codec<u64> {
    /// Little-endian 8 bytes.
    pub fn u64() -> Self {
        Codec::new(
            |v: &u64| v.to_le_bytes().to_vec(),
            |b| {
                b.try_into()
                    .map(u64::from_le_bytes)
                    .map_err(|_| format!("{} bytes, a u64 needs 8", b.len()))
            },
        )
    }
}
