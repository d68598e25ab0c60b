//! MQTT topic names and filters (MQTT 3.1.1 section 4.7): validation and matching.

/// Why a topic name or filter is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InvalidTopic(pub &'static str);

/// A topic name a client publishes to: non-empty, no wildcards, no NUL.
pub(crate) fn validate_name(topic: &str) -> Result<(), InvalidTopic> {
    if topic.is_empty() {
        return Err(InvalidTopic("topic names must not be empty"));
    }
    // One pass over the bytes: this runs for every routed publish.
    match topic.bytes().find(|b| matches!(b, b'+' | b'#' | b'\0')) {
        Some(b'\0') => Err(InvalidTopic("topic names must not contain NUL")),
        Some(_) => Err(InvalidTopic("topic names must not contain wildcards")),
        None => Ok(()),
    }
}

/// A topic filter: `+` stands for one whole level, `#` for the rest and only as the last level.
pub(crate) fn validate_filter(filter: &str) -> Result<(), InvalidTopic> {
    if filter.is_empty() {
        return Err(InvalidTopic("topic filters must not be empty"));
    }
    if filter.contains('\0') {
        return Err(InvalidTopic("topic filters must not contain NUL"));
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i != levels.len() - 1) {
            return Err(InvalidTopic("`#` must be a whole level and the last one"));
        }
        if level.contains('+') && *level != "+" {
            return Err(InvalidTopic("`+` must be a whole level"));
        }
    }
    Ok(())
}

/// The prefix of shared subscriptions (MQTT 5 section 4.8.2).
const SHARE_PREFIX: &str = "$share/";

/// A filter as subscribed: plain, or `$share/{group}/{filter}` (one of the group's
/// subscribers gets each message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SubscribedFilter<'a> {
    pub group: Option<&'a str>,
    /// The filter topics are matched against.
    pub filter: &'a str,
}

/// Parses and validates a SUBSCRIBE filter, shared ones included (4.8.2: the share name is
/// at least one character and has no `/`, `+` or `#`; the filter after it is a valid filter).
pub(crate) fn parse_filter(path: &str) -> Result<SubscribedFilter<'_>, InvalidTopic> {
    let Some(rest) = path.strip_prefix(SHARE_PREFIX) else {
        validate_filter(path)?;
        return Ok(SubscribedFilter {
            group: None,
            filter: path,
        });
    };
    let (group, filter) = rest
        .split_once('/')
        .ok_or(InvalidTopic("expected $share/{group}/{filter}"))?;
    if group.is_empty() || group.contains(['+', '#']) {
        return Err(InvalidTopic(
            "a share name is one or more characters without `+`, `#` or `/`",
        ));
    }
    validate_filter(filter)?;
    Ok(SubscribedFilter {
        group: Some(group),
        filter,
    })
}

/// Whether `filter` matches `topic` (both valid). Topics beginning with `$` are not matched by
/// filters beginning with a wildcard (section 4.7.2).
pub(crate) fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    for level in filter.split('/') {
        match level {
            "#" => return true,
            "+" => {
                if topic_levels.next().is_none() {
                    return false;
                }
            }
            exact => {
                if topic_levels.next() != Some(exact) {
                    return false;
                }
            }
        }
    }
    topic_levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_filters_name_a_group_and_a_valid_filter() {
        assert_eq!(
            parse_filter("$share/workers/jobs/+"),
            Ok(SubscribedFilter {
                group: Some("workers"),
                filter: "jobs/+"
            })
        );
        assert_eq!(parse_filter("jobs/#").map(|f| f.group), Ok(None));
        for bad in [
            "$share/",
            "$share/g",
            "$share//a",
            "$share/g+/a",
            "$share/g/a/#/b",
        ] {
            assert!(parse_filter(bad).is_err(), "{bad}");
        }
        assert!(parse_filter("$shared/a").is_ok(), "not the share prefix");
    }

    fn check(filter: &str, topic: &str, expected: bool) {
        assert_eq!(matches(filter, topic), expected, "{filter} ~ {topic}");
    }

    #[test]
    fn matching_follows_the_spec_examples() {
        check("sport/tennis/player1/#", "sport/tennis/player1", true);
        check(
            "sport/tennis/player1/#",
            "sport/tennis/player1/ranking",
            true,
        );
        check(
            "sport/tennis/player1/#",
            "sport/tennis/player1/score/wimbledon",
            true,
        );
        check("sport/#", "sport", true);
        check("#", "a/b/c", true);
        check("sport/tennis/+", "sport/tennis/player1", true);
        check("sport/tennis/+", "sport/tennis/player1/ranking", false);
        check("sport/+", "sport", false);
        check("sport/+", "sport/", true);
        check("+/+", "/finance", true);
        check("/+", "/finance", true);
        check("+", "/finance", false);
        check("a/b", "a/b", true);
        check("a/b", "a/b/c", false);
        check("a/b/c", "a/b", false);
    }

    #[test]
    fn dollar_topics_are_not_matched_by_leading_wildcards() {
        check("#", "$SYS/monitor/clients", false);
        check("+/monitor/clients", "$SYS/monitor/clients", false);
        check("$SYS/#", "$SYS/monitor/clients", true);
        check("$SYS/monitor/+", "$SYS/monitor/clients", true);
    }

    #[test]
    fn filters_and_names_are_validated() {
        for ok in ["#", "+", "a/+/b", "a/#", "+/+/#", "/", "a//b"] {
            assert!(validate_filter(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/#/b", "a#", "a+/b", "#/a", "a/b#"] {
            assert!(validate_filter(bad).is_err(), "{bad}");
        }
        assert!(validate_name("a/b").is_ok());
        for bad in ["", "a/+", "a/#", "a\0b"] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }
}
