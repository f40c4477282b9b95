// SPDX-License-Identifier: MIT OR Apache-2.0
//! The policy file as written: TOML, deserialized with serde into the raw
//! shapes below. Nothing here is trusted yet; `compile.rs` validates it.
//!
//! Every field that a later check may complain about is `Spanned`, so the
//! complaint can point at `file:line:col`. Unknown keys are refused by
//! `deny_unknown_fields`, which the `toml` crate reports with a span.

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawPolicy {
    #[serde(default)]
    pub defaults: Option<Spanned<RawDefaults>>,
    #[serde(default)]
    pub protect: Option<Spanned<RawProtect>>,
    #[serde(default)]
    pub limits: Option<Spanned<RawLimits>>,
    #[serde(default)]
    pub rule: Vec<Spanned<RawRule>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawDefaults {
    /// The kill(2)-equivalent rule; on unless switched off.
    pub kill_rule: Option<bool>,
    /// Who may ask CheckPermission: "anyone" (default) or "granted".
    pub check: Option<Spanned<String>>,
    /// Milliseconds to let a killed process run its own exit path before
    /// the broker reaps it (0: reap at once, the default).
    pub reap_delay_ms: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawProtect {
    /// Protect processes with oom_score_adj -1000 (default true).
    pub oom_score_adj_min: Option<bool>,
    pub uids: Option<Spanned<Vec<Spanned<IdRange>>>>,
    pub users: Option<Spanned<Vec<Spanned<String>>>>,
    pub cgroups: Option<Spanned<Vec<Spanned<String>>>>,
    pub units: Option<Spanned<Vec<Spanned<String>>>>,
    pub exes: Option<Spanned<Vec<Spanned<String>>>>,
    pub comms: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawLimits {
    /// Kills allowed per `interval-secs`, per caller uid.
    pub kills: Option<Spanned<i64>>,
    pub interval_secs: Option<Spanned<f64>>,
    pub burst: Option<Spanned<i64>>,
    pub max_in_flight: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawRule {
    pub name: Spanned<String>,
    /// "allow" (default) or "deny".
    pub effect: Option<Spanned<String>>,
    /// "kill-and-reap" and/or "check".
    pub actions: Spanned<Vec<Spanned<String>>>,
    pub caller: Option<Spanned<RawCaller>>,
    pub target: Option<Spanned<RawTarget>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawCaller {
    pub any: Option<Spanned<bool>>,
    pub uids: Option<Spanned<Vec<Spanned<IdRange>>>>,
    pub users: Option<Spanned<Vec<Spanned<String>>>>,
    pub gids: Option<Spanned<Vec<Spanned<IdRange>>>>,
    pub groups: Option<Spanned<Vec<Spanned<String>>>>,
    pub cgroups: Option<Spanned<Vec<Spanned<String>>>>,
    pub units: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawTarget {
    pub any: Option<Spanned<bool>>,
    pub uids: Option<Spanned<Vec<Spanned<IdRange>>>>,
    pub users: Option<Spanned<Vec<Spanned<String>>>>,
    pub cgroups: Option<Spanned<Vec<Spanned<String>>>>,
    pub units: Option<Spanned<Vec<Spanned<String>>>>,
    pub exes: Option<Spanned<Vec<Spanned<String>>>>,
    pub comms: Option<Spanned<Vec<Spanned<String>>>>,
    pub oom_score_adj: Option<Spanned<RawOomRange>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawOomRange {
    pub min: Option<i64>,
    pub max: Option<i64>,
}

/// A uid or gid, or an inclusive range of them: `1000`, `"1000"`,
/// `"1000-59999"`. Kept as written; `compile.rs` parses and checks it so
/// the error can carry the position.
#[derive(Debug, Clone)]
pub enum IdRange {
    Int(i64),
    Text(String),
}

impl<'de> Deserialize<'de> for IdRange {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = IdRange;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an id (integer) or a range string like \"1000-59999\"")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<IdRange, E> {
                Ok(IdRange::Int(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<IdRange, E> {
                Ok(IdRange::Int(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<IdRange, E> {
                Ok(IdRange::Text(v.to_string()))
            }
        }
        de.deserialize_any(Visitor)
    }
}
