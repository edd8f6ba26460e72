//! A Redis URL's credentials kept out of what is shown: `Debug`, errors, logs.

/// `url` with its credentials (`user:password@`) replaced by `***@`, for `Debug`,
/// errors and logs; a URL without any is returned as it is.
///
/// ```
/// use metaorch::cache::redacted_url;
/// assert_eq!(redacted_url("redis://:hunter2@cache:6379/0"), "redis://***@cache:6379/0");
/// assert_eq!(redacted_url("redis://cache:6379"), "redis://cache:6379");
/// ```
pub fn redacted_url(url: &str) -> String {
    match userinfo_at(url) {
        Some((start, info)) => format!("{}***{}", &url[..start], &url[start + info.len()..]),
        None => url.to_owned(),
    }
}

/// The user info of `url` and where it starts: between `scheme://` and the last `@`
/// of the authority (a password may hold an `@`).
pub(crate) fn userinfo_at(url: &str) -> Option<(usize, &str)> {
    let start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[start..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    authority.rfind('@').map(|at| (start, &authority[..at]))
}

/// `text` without the URL's credentials, in case an error quotes them.
pub(crate) fn scrub(text: &str, userinfo: Option<&str>) -> String {
    let mut text = text.to_owned();
    if let Some(userinfo) = userinfo.filter(|u| !u.is_empty()) {
        text = text.replace(userinfo, "***");
        let password = userinfo.split_once(':').map_or("", |(_, p)| p);
        // A password of a few letters alone would blank out ordinary words.
        if password.len() >= 4 {
            text = text.replace(password, "***");
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacted_url_hides_user_and_password_only() {
        for (url, shown) in [
            ("redis://:pw@h:6379/0", "redis://***@h:6379/0"),
            ("rediss://user:pw@h", "rediss://***@h"),
            ("redis://user:p@ss@h:1/2?x=@", "redis://***@h:1/2?x=@"),
            ("redis://h:6379", "redis://h:6379"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redacted_url(url), shown, "{url}");
        }
    }

    #[test]
    fn scrub_removes_the_user_info_and_the_password() {
        assert_eq!(
            scrub(
                "auth admin:s3cr3t-pw failed, s3cr3t-pw",
                Some("admin:s3cr3t-pw")
            ),
            "auth *** failed, ***"
        );
        assert_eq!(
            scrub("a pw b", Some("u:pw")),
            "a pw b",
            "too short to scrub alone"
        );
    }
}
