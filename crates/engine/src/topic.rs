//! The IoTDA topic scheme: what a device may publish and subscribe to, and what each uplink topic
//! means. Pure functions, tested as tables.

/// An uplink topic a device may publish to, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uplink<'a> {
    PropertiesReport,
    MessagesUp,
    GatewayPropertiesReport,
    EventsUp,
    /// `$oc/devices/{id}/user/...`: a custom topic; the suffix after `user/`.
    UserTopic(&'a str),
    PropertiesSetResponse {
        request_id: &'a str,
    },
    PropertiesGetResponse {
        request_id: &'a str,
    },
    ShadowGet {
        request_id: &'a str,
    },
    CommandResponse {
        request_id: &'a str,
    },
}

/// A topic split from its optional `?request_id=...&encoding=...` suffix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicQuery<'a> {
    pub path: &'a str,
    pub request_id: Option<&'a str>,
    pub gzip: bool,
}

/// Splits the query suffix SDKs append to report topics.
pub fn split_query(topic: &str) -> TopicQuery<'_> {
    let Some((path, query)) = topic.split_once('?') else {
        return TopicQuery {
            path: topic,
            request_id: None,
            gzip: false,
        };
    };
    let mut request_id = None;
    let mut gzip = false;
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("request_id", v)) if !v.is_empty() => request_id = Some(v),
            Some(("encoding", "gzip")) => gzip = true,
            _ => {}
        }
    }
    TopicQuery {
        path,
        request_id,
        gzip,
    }
}

fn own_suffix<'a>(device_id: &str, topic: &'a str) -> Option<&'a str> {
    topic
        .strip_prefix("$oc/devices/")?
        .strip_prefix(device_id)?
        .strip_prefix('/')
}

fn request_id<'a>(rest: &'a str, prefix: &str) -> Option<&'a str> {
    let id = rest.strip_prefix(prefix)?.strip_prefix("request_id=")?;
    (!id.is_empty() && !id.contains('/')).then_some(id)
}

/// Classifies a topic (without its query suffix) that `device_id` published to; `None` = not allowed.
pub fn classify_uplink<'a>(device_id: &str, path: &'a str) -> Option<Uplink<'a>> {
    let rest = own_suffix(device_id, path)?;
    if let Some(custom) = rest.strip_prefix("user/") {
        return (!custom.is_empty()).then_some(Uplink::UserTopic(custom));
    }
    let sys = rest.strip_prefix("sys/")?;
    let fixed = match sys {
        "properties/report" => Some(Uplink::PropertiesReport),
        "messages/up" => Some(Uplink::MessagesUp),
        "gateway/sub_devices/properties/report" => Some(Uplink::GatewayPropertiesReport),
        "events/up" => Some(Uplink::EventsUp),
        _ => None,
    };
    fixed
        .or_else(|| {
            request_id(sys, "properties/set/response/")
                .map(|request_id| Uplink::PropertiesSetResponse { request_id })
        })
        .or_else(|| {
            request_id(sys, "properties/get/response/")
                .map(|request_id| Uplink::PropertiesGetResponse { request_id })
        })
        .or_else(|| {
            request_id(sys, "shadow/get/").map(|request_id| Uplink::ShadowGet { request_id })
        })
        .or_else(|| {
            request_id(sys, "commands/response/")
                .map(|request_id| Uplink::CommandResponse { request_id })
        })
}

/// The downlink topic prefixes under `$oc/devices/{id}/sys/` a device may subscribe to.
const DOWNLINK_PREFIXES: &[&str] = &[
    "messages/down",
    "properties/set/",
    "properties/get/",
    "shadow/get/response/",
    "commands/",
    "events/down",
];

/// Whether `device_id` may subscribe to `filter`.
pub fn subscribe_allowed(device_id: &str, filter: &str) -> bool {
    if filter.starts_with("$oc/broadcast/") {
        return true;
    }
    let Some(rest) = own_suffix(device_id, filter) else {
        return false;
    };
    if rest == "#" || rest == "sys/#" || rest.starts_with("user/") {
        return true;
    }
    let Some(sys) = rest.strip_prefix("sys/") else {
        return false;
    };
    DOWNLINK_PREFIXES.iter().any(|prefix| {
        sys.starts_with(prefix) || (prefix.ends_with('/') && sys == prefix.trim_end_matches('/'))
    })
}

/// Whether an MQTT topic filter (with `+` and `#`) matches a topic name.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    let mut levels = topic.split('/');
    for part in filter.split('/') {
        match (part, levels.next()) {
            ("#", _) => return true,
            ("+", Some(_)) => {}
            (exact, Some(level)) if exact == level => {}
            _ => return false,
        }
    }
    levels.next().is_none()
}

/// The downlink topics of a device.
pub fn command_topic(device_id: &str, request_id: &str) -> String {
    format!("$oc/devices/{device_id}/sys/commands/request_id={request_id}")
}

pub fn properties_set_topic(device_id: &str, request_id: &str) -> String {
    format!("$oc/devices/{device_id}/sys/properties/set/request_id={request_id}")
}

pub fn properties_get_topic(device_id: &str, request_id: &str) -> String {
    format!("$oc/devices/{device_id}/sys/properties/get/request_id={request_id}")
}

pub fn shadow_response_topic(device_id: &str, request_id: &str) -> String {
    format!("$oc/devices/{device_id}/sys/shadow/get/response/request_id={request_id}")
}

pub fn messages_down_topic(device_id: &str) -> String {
    format!("$oc/devices/{device_id}/sys/messages/down")
}

pub fn user_topic(device_id: &str, suffix: &str) -> String {
    format!("$oc/devices/{device_id}/user/{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: &str = "prod_node-1";

    #[test]
    fn uplink_table() {
        let cases: &[(&str, Option<Uplink<'_>>)] = &[
            (
                "$oc/devices/prod_node-1/sys/properties/report",
                Some(Uplink::PropertiesReport),
            ),
            (
                "$oc/devices/prod_node-1/sys/messages/up",
                Some(Uplink::MessagesUp),
            ),
            (
                "$oc/devices/prod_node-1/sys/events/up",
                Some(Uplink::EventsUp),
            ),
            (
                "$oc/devices/prod_node-1/sys/gateway/sub_devices/properties/report",
                Some(Uplink::GatewayPropertiesReport),
            ),
            (
                "$oc/devices/prod_node-1/user/telemetry/a",
                Some(Uplink::UserTopic("telemetry/a")),
            ),
            (
                "$oc/devices/prod_node-1/sys/commands/response/request_id=42",
                Some(Uplink::CommandResponse { request_id: "42" }),
            ),
            (
                "$oc/devices/prod_node-1/sys/properties/set/response/request_id=a-b",
                Some(Uplink::PropertiesSetResponse { request_id: "a-b" }),
            ),
            (
                "$oc/devices/prod_node-1/sys/properties/get/response/request_id=x",
                Some(Uplink::PropertiesGetResponse { request_id: "x" }),
            ),
            (
                "$oc/devices/prod_node-1/sys/shadow/get/request_id=s1",
                Some(Uplink::ShadowGet { request_id: "s1" }),
            ),
            (
                "$oc/devices/prod_node-1/sys/commands/response/request_id=",
                None,
            ),
            ("$oc/devices/prod_node-1/sys/commands/request_id=42", None),
            ("$oc/devices/prod_node-1/sys/messages/down", None),
            ("$oc/devices/prod_node-1/user/", None),
            ("$oc/devices/other/sys/properties/report", None),
            ("$oc/devices/prod_node-10/sys/properties/report", None),
            ("$oc/devices/prod_node-1", None),
            ("devices/prod_node-1/sys/properties/report", None),
            ("random/topic", None),
        ];
        for (topic, want) in cases {
            assert_eq!(&classify_uplink(ME, topic), want, "{topic}");
        }
    }

    #[test]
    fn subscribe_table() {
        let cases: &[(&str, bool)] = &[
            ("$oc/devices/prod_node-1/sys/commands/#", true),
            ("$oc/devices/prod_node-1/sys/messages/down", true),
            ("$oc/devices/prod_node-1/sys/properties/set/#", true),
            ("$oc/devices/prod_node-1/sys/properties/get/#", true),
            ("$oc/devices/prod_node-1/sys/shadow/get/response/#", true),
            ("$oc/devices/prod_node-1/sys/events/down", true),
            ("$oc/devices/prod_node-1/sys/#", true),
            ("$oc/devices/prod_node-1/#", true),
            ("$oc/devices/prod_node-1/user/cfg", true),
            ("$oc/broadcast/news", true),
            ("$oc/devices/prod_node-1/sys/properties/report", false),
            ("$oc/devices/other/sys/commands/#", false),
            ("$oc/devices/+/sys/commands/#", false),
            ("$oc/devices/#", false),
            ("#", false),
            ("$SYS/broker", false),
        ];
        for (filter, want) in cases {
            assert_eq!(subscribe_allowed(ME, filter), *want, "{filter}");
        }
    }

    #[test]
    fn filter_matching() {
        let cases = [
            ("a/b/c", "a/b/c", true),
            ("a/+/c", "a/b/c", true),
            ("a/#", "a/b/c", true),
            ("a/b/#", "a/b", true),
            ("a/+", "a/b/c", false),
            ("a/b", "a/b/c", false),
            ("a/b/c/d", "a/b/c", false),
            (
                "$oc/devices/d/sys/commands/#",
                "$oc/devices/d/sys/commands/request_id=1",
                true,
            ),
        ];
        for (filter, topic, want) in cases {
            assert_eq!(filter_matches(filter, topic), want, "{filter} vs {topic}");
        }
    }

    #[test]
    fn query_suffix() {
        let q = split_query("$oc/devices/d/sys/properties/report?request_id=r1&encoding=gzip");
        assert_eq!(
            q,
            TopicQuery {
                path: "$oc/devices/d/sys/properties/report",
                request_id: Some("r1"),
                gzip: true
            }
        );
        let q = split_query("a/b");
        assert_eq!(
            q,
            TopicQuery {
                path: "a/b",
                request_id: None,
                gzip: false
            }
        );
    }
}
