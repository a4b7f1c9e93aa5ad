//! The binding's one error map: engine errors, napi failures and panics as JS errors
//! that carry a stable `code`.

/// A JavaScript error that carries its stable code: JS sees `err.code === 'ERR_…'` and
/// `err.message` (the engine's text, no prefix).
/// (`napi::Result<T, Code>` is `Result<T, napi::Error<Code>>`; #[napi] functions must spell
/// it `Result` for the code generator.)
pub(crate) type Code = &'static str;
pub(crate) type CodedError = napi::Error<Code>;

/// The one error map: an engine error becomes a JS error whose `code` is the engine's
/// stable code ([`kvtransfer_engine::ERROR_CODES`]) and whose message is its text.
pub(crate) fn to_js_error(error: kvtransfer_engine::Error) -> CodedError {
    napi::Error::new(error.code(), error.to_string())
}

/// A failure of napi itself (creating a threadsafe function or a Promise): `ERR_IO`, the
/// code the TypeScript layer also gives to any other native failure.
pub(crate) fn napi_failure(error: napi::Error) -> CodedError {
    napi::Error::new("ERR_IO", format!("{} ({})", error.reason, error.status))
}

/// A panic on a binding thread, as the bug it is (`ERR_INTERNAL`, with its message).
pub(crate) fn internal_error(panic: &(dyn std::any::Any + Send)) -> kvtransfer_engine::Error {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string());
    kvtransfer_engine::Error::Internal { what }
}

pub(crate) fn invalid(name: &'static str, reason: impl Into<String>) -> CodedError {
    to_js_error(kvtransfer_engine::Error::invalid(name, reason))
}

#[cfg(test)]
mod tests {
    use super::internal_error;

    #[test]
    fn a_panic_becomes_err_internal_naming_it_and_asking_for_a_report() {
        let owned = std::panic::catch_unwind(|| panic!("slot {} missing", 7)).unwrap_err();
        let error = internal_error(&*owned);
        assert_eq!(error.code(), "ERR_INTERNAL");
        let text = error.to_string();
        assert!(
            text.contains("slot 7 missing") && text.contains("report it"),
            "{text}"
        );
        let literal = std::panic::catch_unwind(|| panic!("plain")).unwrap_err();
        assert!(internal_error(&*literal).to_string().contains("(plain)"));
    }
}
