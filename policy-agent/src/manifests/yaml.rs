//! YAML streams read as JSON values, as the API server stores objects (`serde-saphyr`), with
//! bounds a hostile file cannot get past: aliases may not replay more events than twice the
//! file's size (and [`ALIAS_SLACK`]), which text without aliases never reaches (an event
//! takes at least about a byte) while a "billion laughs", or many aliases of a large anchor,
//! is stopped after that many events and before any value of it is built.

use std::ops::ControlFlow;

/// Events a file may replay through aliases beyond twice its size.
pub const ALIAS_SLACK: usize = 10_000;

/// Why a document of a stream could not be read.
#[derive(Debug, thiserror::Error)]
pub enum YamlError {
    #[error(
        "YAML aliases expand this file to more than {limit} nodes (twice its size and {ALIAS_SLACK} more): not read"
    )]
    AliasExpansion { limit: usize },
    #[error("not valid YAML: {0}")]
    Syntax(#[source] Box<serde_saphyr::Error>),
}

/// The options for one stream of `len` bytes: the alias replay bound above; parser events and
/// nodes bounded by the size too (the file's size is bounded by the caller); as many
/// documents as the text holds (the caller counts objects). Scalars are typed by YAML 1.2's
/// core schema, as before with `serde_yaml`: only `true`/`false` are booleans (namespace `y`
/// and label value `on` stay strings), `007` and `1_000` stay strings.
pub fn options(len: usize) -> serde_saphyr::Options {
    let bound = len.saturating_mul(2).saturating_add(ALIAS_SLACK);
    let mut o = serde_saphyr::Options::default();
    o.alias_limits.max_total_replayed_events = bound;
    o.with_snippet = false;
    o.strict_booleans = true;
    o.leading_zero_numbers_as_strings = true;
    o.underscored_numbers_as_strings = true;
    if let Some(b) = o.budget.as_mut() {
        b.max_events = bound;
        b.max_nodes = bound;
        b.max_documents = usize::MAX;
        // The replay bound is what limits expansion: many aliases of one small anchor (a
        // selector shared by policies) are fine.
        b.enforce_alias_anchor_ratio = false;
    }
    o
}

/// The one document of `text` as `T`, read with [`options`].
pub fn from_str<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, serde_saphyr::Error> {
    serde_saphyr::from_str_with_options(text, options(text.len()))
}

/// Reads the documents of `text` in order, calling `each` with the 1-based document number
/// and its value (empty documents skipped) until it breaks. A document that cannot be read
/// ends the stream (the parser cannot resume after it): `each` gets its error, last.
pub fn for_each_document(
    text: &str,
    mut each: impl FnMut(usize, Result<serde_json::Value, YamlError>) -> ControlFlow<()>,
) {
    let limit = text.len().saturating_mul(2).saturating_add(ALIAS_SLACK);
    let mut bytes = text.as_bytes();
    let docs =
        serde_saphyr::read_with_options::<_, serde_json::Value>(&mut bytes, options(text.len()));
    for (i, doc) in docs.enumerate() {
        let document = i + 1;
        match doc {
            Ok(serde_json::Value::Null) => continue,
            Ok(v) => {
                if each(document, Ok(v)).is_break() {
                    return;
                }
            }
            Err(e) => {
                use serde_saphyr::budget::BudgetBreach;
                // Replayed events count as events and nodes too; without aliases a stream
                // holds fewer events and nodes than bytes, so only an expansion breaches them.
                let e = match innermost(&e) {
                    serde_saphyr::Error::AliasReplayLimitExceeded { .. }
                    | serde_saphyr::Error::Budget {
                        breach: BudgetBreach::Events { .. } | BudgetBreach::Nodes { .. },
                        ..
                    } => YamlError::AliasExpansion { limit },
                    _ => YamlError::Syntax(Box::new(e)),
                };
                let _ = each(document, Err(e));
                return;
            }
        }
    }
}

/// The error inside the parser's wrappers (the alias it was met through, a snippet).
fn innermost(mut e: &serde_saphyr::Error) -> &serde_saphyr::Error {
    loop {
        match e.without_snippet() {
            serde_saphyr::Error::AliasError { error, .. } => e = error,
            inner => return inner,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Vec<Result<serde_json::Value, String>> {
        let mut out = Vec::new();
        for_each_document(text, |_, d| {
            out.push(d.map_err(|e| e.to_string()));
            ControlFlow::Continue(())
        });
        out
    }

    #[test]
    fn documents_in_order_empty_ones_skipped() {
        let docs = read("a: 1\n---\n---\nb: [x, y]\n...\n");
        assert_eq!(
            docs,
            vec![
                Ok(serde_json::json!({"a": 1})),
                Ok(serde_json::json!({"b": ["x", "y"]}))
            ]
        );
    }

    #[test]
    fn a_syntax_error_ends_the_stream_after_the_good_documents() {
        let docs = read("a: 1\n---\nkind: [unclosed\n---\nc: 3\n");
        assert_eq!(docs.len(), 2, "{docs:?}");
        assert_eq!(docs[0], Ok(serde_json::json!({"a": 1})));
        assert!(
            docs[1]
                .as_ref()
                .is_err_and(|e| e.starts_with("not valid YAML")),
            "{docs:?}"
        );
    }

    #[test]
    fn small_aliases_are_fine() {
        let docs = read("a: &sel {app: web}\nb: *sel\nc: *sel\nd: *sel\n");
        assert_eq!(
            docs,
            vec![Ok(serde_json::json!({
                "a": {"app": "web"}, "b": {"app": "web"}, "c": {"app": "web"}, "d": {"app": "web"}
            }))]
        );
    }

    #[test]
    fn scalars_follow_the_yaml_1_2_core_schema() {
        let docs = read("ns: y\nv: on\nz: 007\nn: 1_000\nb: true\ni: 80\n");
        assert_eq!(
            docs,
            vec![Ok(serde_json::json!({
                "ns": "y", "v": "on", "z": "007", "n": "1_000", "b": true, "i": 80
            }))]
        );
    }

    #[test]
    fn duplicate_keys_are_an_error() {
        let docs = read("a: 1\na: 2\n");
        assert!(docs[0].is_err(), "{docs:?}");
    }
}
