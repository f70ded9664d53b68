//! SQL commands sluice must see coming, beyond read/write classification: those that need a
//! database that no session uses, which sluice's own pooled connections would otherwise block.

/// The database that `DROP DATABASE name`, `ALTER DATABASE name RENAME TO ...` or
/// `CREATE DATABASE ... TEMPLATE name` needs unused (a single statement; names fold to lower
/// case unless quoted, as PostgreSQL folds them).
pub fn database_to_release(sql: &[u8]) -> Option<String> {
    let words = words(sql)?;
    let word = |i: usize| words.get(i).map(|w| w.text.as_str());
    let is = |i: usize, keyword: &str| {
        words
            .get(i)
            .is_some_and(|w| !w.quoted && w.text.eq_ignore_ascii_case(keyword))
    };
    if is(0, "DROP") && is(1, "DATABASE") {
        let at = if is(2, "IF") && is(3, "EXISTS") { 4 } else { 2 };
        return word(at).map(|_| words[at].name());
    }
    if is(0, "ALTER") && is(1, "DATABASE") && is(3, "RENAME") {
        return word(2).map(|_| words[2].name());
    }
    if is(0, "CREATE") && is(1, "DATABASE") {
        let at = words
            .iter()
            .position(|w| !w.quoted && w.text.eq_ignore_ascii_case("TEMPLATE"))?;
        let at = if word(at + 1) == Some("=") { at + 2 } else { at + 1 };
        return word(at).map(|_| words[at].name());
    }
    None
}

struct Word {
    text: String,
    quoted: bool,
}

impl Word {
    fn name(&self) -> String {
        if self.quoted {
            self.text.clone()
        } else {
            self.text.to_ascii_lowercase()
        }
    }
}

/// Words, `"quoted identifiers"`, `=` and parentheses of one statement; `None` when there is
/// more than one statement, a comment or a string (not a command this module looks for).
fn words(sql: &[u8]) -> Option<Vec<Word>> {
    let sql = std::str::from_utf8(sql).ok()?.trim();
    let sql = sql.strip_suffix(';').unwrap_or(sql).trim_end();
    if sql.contains(';') || sql.contains("--") || sql.contains("/*") || sql.contains('\'') {
        return None;
    }
    let mut out = Vec::new();
    let mut chars = sql.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '"' {
            chars.next();
            let mut text = String::new();
            loop {
                match chars.next()? {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        text.push('"');
                    }
                    '"' => break,
                    c => text.push(c),
                }
            }
            out.push(Word { text, quoted: true });
        } else if matches!(c, '=' | '(' | ')' | ',') {
            chars.next();
            out.push(Word {
                text: c.to_string(),
                quoted: false,
            });
        } else {
            let mut text = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() || matches!(c, '=' | '(' | ')' | ',' | '"') {
                    break;
                }
                text.push(c);
                chars.next();
            }
            out.push(Word { text, quoted: false });
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_that_need_a_database_unused() {
        let d = |s: &str| database_to_release(s.as_bytes());
        assert_eq!(d("DROP DATABASE foo"), Some("foo".into()));
        assert_eq!(d("drop database if exists Foo;"), Some("foo".into()));
        assert_eq!(d("DROP DATABASE \"My Db\" WITH (FORCE)"), Some("My Db".into()));
        assert_eq!(d("ALTER DATABASE old RENAME TO new"), Some("old".into()));
        assert_eq!(d("ALTER DATABASE old SET work_mem = '1MB'"), None);
        assert_eq!(d("CREATE DATABASE x TEMPLATE tmpl"), Some("tmpl".into()));
        assert_eq!(
            d("CREATE DATABASE x WITH OWNER app TEMPLATE = \"T\" ENCODING UTF8"),
            Some("T".into())
        );
        assert_eq!(d("CREATE DATABASE x"), None);
        assert_eq!(d("DROP TABLE foo"), None);
        assert_eq!(d("DROP DATABASE a; DROP DATABASE b"), None);
    }
}
