//! SQL commands sluice must see coming, beyond read/write classification: those that need a
//! database that no session uses (which a proxy's own pooled connections would otherwise
//! block), and the SQL-level `EXECUTE`/`DEALLOCATE`/`DISCARD ALL` that act on prepared
//! statements a proxy renames.

/// The database that `DROP DATABASE name`, `ALTER DATABASE name RENAME TO ...` or
/// `CREATE DATABASE ... TEMPLATE name` needs unused (a single statement; names fold to lower
/// case unless quoted, as PostgreSQL folds them).
pub fn database_to_release(sql: &[u8]) -> Option<String> {
    // A first look without allocating: this runs for every simple query, and only these three
    // commands qualify (a leading comment disqualifies a statement below too).
    let head = sql.trim_ascii_start();
    let starts_with = |k: &[u8]| head.get(..k.len()).is_some_and(|h| h.eq_ignore_ascii_case(k));
    if !(starts_with(b"DROP") || starts_with(b"ALTER") || starts_with(b"CREATE")) {
        return None;
    }
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

/// What a `DEALLOCATE` or `DISCARD` statement drops.
#[derive(Debug, PartialEq, Eq)]
pub enum Deallocate {
    /// Every prepared statement (`DEALLOCATE ALL`, `DISCARD ALL`).
    All,
    /// The statement of this name.
    Name(Vec<u8>),
}

/// Recognises `EXECUTE name ...`: the name (folded to lower case unless quoted) and the rest of
/// the text after it (parameters, further statements), verbatim.
pub fn parse_execute(sql: &[u8]) -> Option<(Vec<u8>, &[u8])> {
    parse_named(b"EXECUTE", sql)
}

/// Recognises `PREPARE name ...` the same way: the name and the rest (parameter types, `AS`,
/// the statement, further statements), verbatim. `PREPARE TRANSACTION` is not one.
pub fn parse_prepare(sql: &[u8]) -> Option<(Vec<u8>, &[u8])> {
    let (name, rest) = parse_named(b"PREPARE", sql)?;
    let quoted = skip_blanks(sql)[7..].trim_ascii_start().starts_with(b"\"");
    (quoted || name != b"transaction").then_some((name, rest))
}

/// `sql` after its leading whitespace and comments (`-- …` to the end of the line, `/* … */`
/// nested as PostgreSQL nests them; an unterminated one leaves nothing).
pub fn skip_blanks(mut sql: &[u8]) -> &[u8] {
    loop {
        sql = sql.trim_ascii_start();
        if let Some(rest) = sql.strip_prefix(b"--") {
            sql = rest
                .iter()
                .position(|&b| b == b'\n')
                .map_or(&[][..], |i| &rest[i + 1..]);
        } else if sql.starts_with(b"/*") {
            let (mut depth, mut i) = (0usize, 0);
            while depth > 0 || i == 0 {
                match sql.get(i..i + 2) {
                    None => return &[],
                    Some(b"/*") => (depth, i) = (depth + 1, i + 2),
                    Some(b"*/") => (depth, i) = (depth - 1, i + 2),
                    Some(_) => i += 1,
                }
            }
            sql = &sql[i..];
        } else {
            return sql;
        }
    }
}

/// `keyword name ...` at the start of `sql` (after whitespace and comments): the name (folded to lower case unless quoted; a
/// quoted name with a doubled quote inside is left to the server) and the text after it.
fn parse_named<'a>(keyword: &[u8], sql: &'a [u8]) -> Option<(Vec<u8>, &'a [u8])> {
    let sql = skip_blanks(sql);
    let n = keyword.len();
    if !sql.get(..n)?.eq_ignore_ascii_case(keyword) || !sql.get(n)?.is_ascii_whitespace() {
        return None;
    }
    let after = sql[n..].trim_ascii_start();
    if let Some(quoted) = after.strip_prefix(b"\"") {
        let end = quoted.iter().position(|&b| b == b'"')?;
        if quoted.get(end + 1) == Some(&b'"') {
            return None; // a doubled quote inside: leave it to the server
        }
        return Some((quoted[..end].to_vec(), &quoted[end + 1..]));
    }
    let end = after
        .iter()
        .position(|&b| !(b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80))
        .unwrap_or(after.len());
    if end == 0 || after[0].is_ascii_digit() {
        return None;
    }
    Some((after[..end].to_ascii_lowercase(), &after[end..]))
}

/// Recognises `DEALLOCATE [PREPARE] name|ALL` and `DISCARD ALL` (a single statement, any case,
/// after whitespace and comments, optional trailing `;`). Unquoted names fold to lower case, as PostgreSQL folds them.
pub fn parse_deallocate(sql: &[u8]) -> Option<Deallocate> {
    let sql = skip_blanks(sql).trim_ascii_end();
    let sql = sql.strip_suffix(b";").unwrap_or(sql).trim_ascii_end();
    let mut words = sql.split(|b| b.is_ascii_whitespace()).filter(|w| !w.is_empty());
    let first = words.next()?;
    if first.eq_ignore_ascii_case(b"DISCARD") {
        let w = words.next()?;
        return (w.eq_ignore_ascii_case(b"ALL") && words.next().is_none()).then_some(Deallocate::All);
    }
    if !first.eq_ignore_ascii_case(b"DEALLOCATE") {
        return None;
    }
    let mut name = words.next()?;
    if name.eq_ignore_ascii_case(b"PREPARE") {
        name = words.next()?;
    }
    if words.next().is_some() {
        return None;
    }
    if name.eq_ignore_ascii_case(b"ALL") {
        return Some(Deallocate::All);
    }
    let name = match name.strip_prefix(b"\"").and_then(|n| n.strip_suffix(b"\"")) {
        Some(quoted) => {
            let s = String::from_utf8_lossy(quoted).replace("\"\"", "\"");
            s.into_bytes()
        }
        None => name.to_ascii_lowercase(),
    };
    Some(Deallocate::Name(name))
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

    #[test]
    fn execute_statements() {
        let e =
            |s: &'static str| parse_execute(s.as_bytes()).map(|(n, r)| (String::from_utf8(n).unwrap(), r));
        assert_eq!(e("EXECUTE foo"), Some(("foo".into(), &b""[..])));
        assert_eq!(
            e(" execute Foo(1, 'a;b');"),
            Some(("foo".into(), &b"(1, 'a;b');"[..]))
        );
        assert_eq!(e("EXECUTE \"Foo\" (1)"), Some(("Foo".into(), &b" (1)"[..])));
        assert_eq!(e("EXECUTED"), None);
        assert_eq!(e("EXECUTE 1"), None);
        assert_eq!(e("SELECT 1"), None);
    }

    #[test]
    fn leading_comments_are_skipped() {
        assert_eq!(
            skip_blanks(b" /* a /* nested */ b */ -- c\n EXECUTE x"),
            b"EXECUTE x"
        );
        assert_eq!(skip_blanks(b"/**/x"), b"x");
        assert_eq!(skip_blanks(b"/* open"), b"");
        assert_eq!(skip_blanks(b"-- only"), b"");
        assert_eq!(skip_blanks(b"/ 1"), b"/ 1");
        assert_eq!(
            parse_execute(b"/* app */ EXECUTE s1(1)"),
            Some((b"s1".to_vec(), &b"(1)"[..]))
        );
        assert_eq!(
            parse_deallocate(b"-- x\nDEALLOCATE s1;"),
            Some(Deallocate::Name(b"s1".to_vec()))
        );
    }

    #[test]
    fn prepare_statements() {
        let p =
            |s: &'static str| parse_prepare(s.as_bytes()).map(|(n, r)| (String::from_utf8(n).unwrap(), r));
        assert_eq!(
            p("PREPARE s1 AS SELECT 1"),
            Some(("s1".into(), &b" AS SELECT 1"[..]))
        );
        assert_eq!(
            p("prepare Q (int) as select $1"),
            Some(("q".into(), &b" (int) as select $1"[..]))
        );
        assert_eq!(
            p("PREPARE \"Q\" AS SELECT 1"),
            Some(("Q".into(), &b" AS SELECT 1"[..]))
        );
        assert_eq!(p("PREPARE TRANSACTION 'x'"), None);
        assert_eq!(p("PREPARE \"transaction\" AS SELECT 1").unwrap().0, "transaction");
        assert_eq!(p("PREPARED s1"), None);
        assert_eq!(p("EXECUTE s1"), None);
    }

    #[test]
    fn deallocate_statements() {
        let d = |s: &str| parse_deallocate(s.as_bytes());
        assert_eq!(d("DEALLOCATE ALL"), Some(Deallocate::All));
        assert_eq!(d("  discard all ;"), Some(Deallocate::All));
        assert_eq!(d("DEALLOCATE PREPARE all"), Some(Deallocate::All));
        assert_eq!(d("DEALLOCATE S1"), Some(Deallocate::Name(b"s1".to_vec())));
        assert_eq!(
            d("deallocate prepare \"S1\";"),
            Some(Deallocate::Name(b"S1".to_vec()))
        );
        assert_eq!(d("DISCARD PLANS"), None);
        assert_eq!(d("DEALLOCATE a; SELECT 1"), None);
        assert_eq!(d("SELECT 1"), None);
    }
}
