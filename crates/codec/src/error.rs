//! The one error type of the codec crate.

/// What went wrong with a codec definition or with one payload.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    /// The definition cannot be saved; the text names the message and field.
    #[error("codec definition: {0}")]
    Definition(String),
    /// Device bytes that do not fit the definition.
    #[error("cannot decode: {0}")]
    Decode(String),
    /// Platform JSON that the definition cannot turn into bytes.
    #[error("cannot encode: {0}")]
    Encode(String),
}

pub(crate) fn definition(text: impl Into<String>) -> CodecError {
    CodecError::Definition(text.into())
}
