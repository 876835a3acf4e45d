//! Keeping secrets out of logs, errors and `Debug` output.

/// The URL with the password of its user info replaced by `<redacted>`
/// (`amqp://app:s3cret@host/` → `amqp://app:<redacted>@host/`); URLs without a password are
/// returned unchanged. Every adapter and store prints connection URLs through this.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:<redacted>@{host}"),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_are_replaced_and_nothing_else() {
        assert_eq!(
            redact_url("amqps://app:s3cret@rabbit:5671/prod"),
            "amqps://app:<redacted>@rabbit:5671/prod"
        );
        assert_eq!(
            redact_url("redis://:p@ss@cache:6379"),
            "redis://:<redacted>@cache:6379"
        );
        assert_eq!(redact_url("postgres://app@db/x"), "postgres://app@db/x");
        assert_eq!(redact_url("127.0.0.1:9092"), "127.0.0.1:9092");
    }
}
