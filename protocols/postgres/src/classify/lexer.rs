//! Byte tokenizer for the classifier: skips whitespace, comments, strings and dollar quotes, and
//! yields borrowed tokens (no allocation). Routing hints found in comments are recorded on the way.

use super::Hint;

/// One significant token. Strings and numbers carry no content: the classifier never needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Tok<'a> {
    /// Unquoted identifier or keyword, as written (compare case-insensitively).
    Word(&'a [u8]),
    /// "quoted identifier" content, case preserved (doubled quotes left as is).
    QuotedIdent(&'a [u8]),
    /// Any string constant: '...', E'...', $tag$...$tag$.
    Str,
    /// Numeric literal or `$n` parameter.
    Num,
    /// Any other single byte: punctuation or one byte of an operator.
    Punct(u8),
}

/// Tokenizer state over one query string.
pub(super) struct Lexer<'a> {
    s: &'a [u8],
    pos: usize,
    /// Whether plain '...' strings treat backslash as an escape (standard_conforming_strings off).
    backslash_quotes: bool,
    /// First `sluice: primary|replica` comment seen so far.
    pub(super) hint: Option<Hint>,
    /// A string, identifier or comment ran to the end of input: PostgreSQL will reject the query,
    /// and our view of where statements start may differ from its, so the caller plays safe.
    pub(super) unterminated: bool,
    /// Where the content of the last '...' string token lies (quotes excluded, escapes as
    /// written).
    str_span: (usize, usize),
}

/// Byte classes, one bit each: a table lookup per byte instead of a chain of comparisons
/// (the lexer reads every byte of every classified query).
const SPACE: u8 = 1;
/// Starts an unquoted identifier: ASCII letters, `_` and every non-ASCII byte.
const IDENT_START: u8 = 2;
/// Continues an unquoted identifier: its start bytes, digits and `$`.
const IDENT_CONT: u8 = 4;
/// Continues a numeric literal: ASCII letters and digits, `_` and `.`.
const NUM_CONT: u8 = 8;

static CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        let mut c = 0;
        if matches!(b, b' ' | b'\t' | b'\n' | b'\r' | b'\x0b' | b'\x0c') {
            c |= SPACE;
        }
        if b.is_ascii_alphabetic() || b == b'_' || b >= 0x80 {
            c |= IDENT_START | IDENT_CONT;
        }
        if b.is_ascii_digit() || b == b'$' {
            c |= IDENT_CONT;
        }
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'.' {
            c |= NUM_CONT;
        }
        t[i] = c;
        i += 1;
    }
    t
};

fn has(b: u8, class: u8) -> bool {
    CLASS[usize::from(b)] & class != 0
}

fn is_ident_start(b: u8) -> bool {
    has(b, IDENT_START)
}

fn is_ident_cont(b: u8) -> bool {
    has(b, IDENT_CONT)
}

/// Comment content `sluice: primary` / `sluice:replica` (trimmed, case-insensitive).
fn hint_in(comment: &[u8]) -> Option<Hint> {
    let c = comment.trim_ascii();
    let prefix = b"sluice:";
    if c.len() < prefix.len() || !c[..prefix.len()].eq_ignore_ascii_case(prefix) {
        return None;
    }
    let word = c[prefix.len()..].trim_ascii_start();
    if word.eq_ignore_ascii_case(b"primary") {
        Some(Hint::Primary)
    } else if word.eq_ignore_ascii_case(b"replica") {
        Some(Hint::Replica)
    } else {
        None
    }
}

impl<'a> Lexer<'a> {
    pub(super) fn new(s: &'a [u8], backslash_quotes: bool) -> Self {
        Lexer {
            s,
            pos: 0,
            backslash_quotes,
            hint: None,
            unterminated: false,
            str_span: (0, 0),
        }
    }

    /// The content of the last '...' or E'...' string token, as written between the quotes.
    pub(super) fn last_str(&self) -> &'a [u8] {
        &self.s[self.str_span.0..self.str_span.1]
    }

    fn peek_at(&self, i: usize) -> Option<u8> {
        self.s.get(i).copied()
    }

    fn note_comment(&mut self, content: &[u8]) {
        if self.hint.is_none() {
            self.hint = hint_in(content);
        }
    }

    /// The next significant token, or `None` at end of input.
    pub(super) fn next_tok(&mut self) -> Option<Tok<'a>> {
        loop {
            let b = self.peek_at(self.pos)?;
            let class = CLASS[usize::from(b)];
            if class & SPACE != 0 {
                self.pos += 1;
                continue;
            }
            // Words first: most tokens are keywords and names.
            if class & IDENT_START != 0 {
                return Some(self.word());
            }
            let next = self.peek_at(self.pos + 1);
            match b {
                b'-' if next == Some(b'-') => self.line_comment(),
                b'/' if next == Some(b'*') => self.block_comment(),
                b'\'' => {
                    self.pos += 1;
                    self.string(self.backslash_quotes);
                    return Some(Tok::Str);
                }
                b'"' => return Some(self.quoted_ident()),
                b'$' => return Some(self.dollar()),
                b'0'..=b'9' => return Some(self.number()),
                b'.' if next.is_some_and(|n| n.is_ascii_digit()) => return Some(self.number()),
                _ => {
                    self.pos += 1;
                    return Some(Tok::Punct(b));
                }
            }
        }
    }

    #[inline(never)]
    fn line_comment(&mut self) {
        let start = self.pos + 2;
        let end = memchr::memchr2(b'\n', b'\r', &self.s[start..]).map_or(self.s.len(), |i| start + i);
        self.pos = end;
        self.note_comment(&self.s[start..end]);
    }

    /// `/* ... */`, nesting like PostgreSQL's.
    #[inline(never)]
    fn block_comment(&mut self) {
        let start = self.pos + 2;
        let mut i = start;
        let mut depth = 1usize;
        // Only '/' and '*' matter: jump from one to the next.
        while let Some(k) = self.s.get(i..).and_then(|rest| memchr::memchr2(b'/', b'*', rest)) {
            i += k;
            match (self.s[i], self.peek_at(i + 1)) {
                (b'/', Some(b'*')) => {
                    depth += 1;
                    i += 2;
                }
                (b'*', Some(b'/')) => {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        self.pos = i;
                        self.note_comment(&self.s[start..i - 2]);
                        return;
                    }
                }
                _ => i += 1,
            }
        }
        self.pos = self.s.len();
        self.unterminated = true;
    }

    /// Rest of a single-quoted string (opening quote consumed); `''` is an escaped quote and, in
    /// escape strings, so is `\'`.
    #[inline(never)]
    fn string(&mut self, backslash: bool) {
        let mut i = self.pos;
        // Only quotes (and backslashes, when they escape) matter: jump from one to the next.
        let special = |rest: &[u8]| {
            if backslash {
                memchr::memchr2(b'\'', b'\\', rest)
            } else {
                memchr::memchr(b'\'', rest)
            }
        };
        while let Some(k) = self.s.get(i..).and_then(special) {
            i += k;
            match self.s[i] {
                b'\\' => i += 2,
                _ if self.peek_at(i + 1) == Some(b'\'') => i += 2,
                _ => {
                    self.str_span = (self.pos, i);
                    self.pos = i + 1;
                    return;
                }
            }
        }
        self.str_span = (self.pos, self.s.len());
        self.pos = self.s.len();
        self.unterminated = true;
    }

    #[inline(never)]
    fn quoted_ident(&mut self) -> Tok<'a> {
        let start = self.pos + 1;
        let mut i = start;
        while let Some(k) = self.s.get(i..).and_then(|rest| memchr::memchr(b'"', rest)) {
            i += k;
            if self.peek_at(i + 1) == Some(b'"') {
                i += 2;
                continue;
            }
            self.pos = i + 1;
            return Tok::QuotedIdent(&self.s[start..i]);
        }
        self.pos = self.s.len();
        self.unterminated = true;
        Tok::QuotedIdent(&self.s[start..])
    }

    /// `$1` parameter, `$tag$ ... $tag$` string, or a lone `$`.
    #[inline(never)]
    fn dollar(&mut self) -> Tok<'a> {
        let start = self.pos;
        let s = self.s;
        let mut i = start + 1;
        if s.get(i).is_some_and(|b| b.is_ascii_digit()) {
            while s.get(i).is_some_and(|b| b.is_ascii_digit()) {
                i += 1;
            }
            self.pos = i;
            return Tok::Num;
        }
        // Tag: optional identifier without '$', then '$'.
        if s.get(i).is_some_and(|&b| is_ident_start(b)) {
            i += 1;
            while s.get(i).is_some_and(|&b| is_ident_cont(b) && b != b'$') {
                i += 1;
            }
        }
        if s.get(i) != Some(&b'$') {
            self.pos = start + 1;
            return Tok::Punct(b'$');
        }
        let delim = &s[start..=i];
        // Linear: tags contain no '$', so each attempt at a '$' reads no further than the next '$'.
        let mut j = i + 1;
        while let Some(k) = memchr::memchr(b'$', &s[j..]) {
            j += k;
            if s[j..].starts_with(delim) {
                self.str_span = (i + 1, j);
                self.pos = j + delim.len();
                return Tok::Str;
            }
            j += 1;
        }
        self.str_span = (i + 1, s.len());
        self.pos = s.len();
        self.unterminated = true;
        Tok::Str
    }

    fn number(&mut self) -> Tok<'a> {
        let mut i = self.pos + 1;
        while self.peek_at(i).is_some_and(|b| has(b, NUM_CONT)) {
            i += 1;
        }
        self.pos = i;
        Tok::Num
    }

    fn word(&mut self) -> Tok<'a> {
        let start = self.pos;
        let mut i = start + 1;
        while self.peek_at(i).is_some_and(is_ident_cont) {
            i += 1;
        }
        // E'...' (escape string constant): backslash escapes regardless of the setting.
        if i == start + 1 && matches!(self.s[start], b'e' | b'E') && self.peek_at(i) == Some(b'\'') {
            self.pos = i + 1;
            self.string(true);
            return Tok::Str;
        }
        self.pos = i;
        Tok::Word(&self.s[start..i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(sql: &str) -> (Vec<Tok<'_>>, bool) {
        let mut lx = Lexer::new(sql.as_bytes(), false);
        let mut v = Vec::new();
        while let Some(t) = lx.next_tok() {
            v.push(t);
        }
        (v, lx.unterminated)
    }

    #[test]
    fn tokens() {
        use Tok::*;
        let (t, u) =
            toks("SELECT a.\"B\"\"c\", 'x''y', E'\\'', $$a;b$$, $q$ $ $q$, $1, 1.5e3 /* /* n */ */ -- c\n;");
        assert!(!u);
        assert_eq!(
            t,
            vec![
                Word(b"SELECT"),
                Word(b"a"),
                Punct(b'.'),
                QuotedIdent(b"B\"\"c"),
                Punct(b','),
                Str,
                Punct(b','),
                Str,
                Punct(b','),
                Str,
                Punct(b','),
                Str,
                Punct(b','),
                Num,
                Punct(b','),
                Num,
                Punct(b';'),
            ]
        );
    }

    #[test]
    fn identifiers_with_dollars_are_not_dollar_quotes() {
        let (t, u) = toks("SELECT a$b$ FROM t");
        assert!(!u);
        assert_eq!(t[1], Tok::Word(b"a$b$"));
    }

    #[test]
    fn unterminated() {
        for sql in ["'abc", "\"abc", "/* abc", "/* /* */", "$x$ abc $x", "E'\\'"] {
            assert!(toks(sql).1, "{sql}");
        }
    }

    #[test]
    fn hints() {
        let hint = |sql: &str| {
            let mut lx = Lexer::new(sql.as_bytes(), false);
            while lx.next_tok().is_some() {}
            lx.hint
        };
        assert_eq!(hint("/* sluice: primary */ SELECT 1"), Some(Hint::Primary));
        assert_eq!(hint("SELECT 1 -- SLUICE:Replica"), Some(Hint::Replica));
        assert_eq!(hint("SELECT 1 /*sluice:  replica*/"), Some(Hint::Replica));
        assert_eq!(hint("SELECT '/* sluice: primary */'"), None);
        assert_eq!(hint("/* sluice: primary please */"), None);
        assert_eq!(hint("/* sluice replica */"), None);
    }
}
