//! `{param}` templates in upstream URLs, rewrites and redirects.

use std::fmt::Write;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    Param(String),
}

/// A parsed template such as `http://{name}:8080/{rest}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pieces: Vec<Piece>,
}

impl Template {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                pieces.push(Piece::Literal(rest[..open].to_owned()));
            }
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| format!("unclosed `{{` in template {s:?}"))?;
            let name = after[..close].trim_start_matches('*');
            // `.` names a field of an earlier aggregation part (`{user.team_id}`).
            let ok_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '.';
            if name.is_empty() || !name.chars().all(ok_char) {
                return Err(format!("invalid parameter name {name:?} in template {s:?}"));
            }
            pieces.push(Piece::Param(name.to_owned()));
            rest = &after[close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("unmatched `}}` in template {s:?}"));
        }
        if !rest.is_empty() {
            pieces.push(Piece::Literal(rest.to_owned()));
        }
        Ok(Template { pieces })
    }

    pub fn is_literal(&self) -> bool {
        self.pieces.iter().all(|p| matches!(p, Piece::Literal(_)))
    }

    pub fn params(&self) -> impl Iterator<Item = &str> {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Param(n) => Some(n.as_str()),
            Piece::Literal(_) => None,
        })
    }

    /// Renders with `lookup`; `None` from lookup renders as empty.
    pub fn render<'a>(&self, lookup: impl Fn(&str) -> Option<&'a str>) -> String {
        let mut out = String::with_capacity(64);
        for p in &self.pieces {
            match p {
                Piece::Literal(l) => out.push_str(l),
                Piece::Param(n) => {
                    let _ = write!(out, "{}", lookup(n).unwrap_or(""));
                }
            }
        }
        out
    }
}

/// The value of template parameter `name`: a captured path param, or `rest` — the
/// remainder of a prefix match without its leading slash.
pub fn param_value<'a>(
    params: &[(&str, &'a str)],
    rest: Option<&'a str>,
    name: &str,
) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| *k == name)
        .map(|(_, v)| *v)
        .or_else(|| {
            (name == "rest")
                .then(|| rest.map(|r| r.trim_start_matches('/')))
                .flatten()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_params() {
        let t = Template::parse("http://{name}:8080/{rest}").unwrap();
        assert_eq!(t.params().collect::<Vec<_>>(), ["name", "rest"]);
        let out = t.render(|n| match n {
            "name" => Some("hello"),
            "rest" => Some("a/b"),
            _ => None,
        });
        assert_eq!(out, "http://hello:8080/a/b");
        assert!(Template::parse("http://x").unwrap().is_literal());
        assert!(Template::parse("http://{x").is_err());
        assert!(Template::parse("http://{a b}").is_err());
    }
}
