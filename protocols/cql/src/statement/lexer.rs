//! Tokens of CQL text: identifiers, quoted names, string/number/uuid/blob constants, bind
//! markers and punctuation. Comments are skipped.

use crate::value::Literal;

/// One token.
#[derive(Debug, Clone, PartialEq)]
pub enum Tok {
    /// An unquoted identifier or keyword, lowercased.
    Ident(String),
    /// A `"quoted"` identifier, case preserved.
    Quoted(String),
    Lit(Literal),
    /// `?` (with its position among all `?` of the statement) or `:name`.
    Bind(Option<String>, usize),
    /// Punctuation and operators: `( ) , ; . = < > <= >= != * [ ] { } : + -`.
    Sym(&'static str),
}

/// Why text could not be tokenized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LexError(pub String);

const SYMBOLS: [&str; 18] = [
    "<=", ">=", "!=", "(", ")", ",", ";", ".", "=", "<", ">", "*", "[", "]", "{", "}", ":", "+",
];

fn is_uuid_at(b: &[u8]) -> bool {
    if b.len() < 36 {
        return false;
    }
    for (i, &c) in b[..36].iter().enumerate() {
        let ok = if matches!(i, 8 | 13 | 18 | 23) {
            c == b'-'
        } else {
            c.is_ascii_hexdigit()
        };
        if !ok {
            return false;
        }
    }
    b.get(36)
        .is_none_or(|c| !(c.is_ascii_alphanumeric() || *c == b'_'))
}

fn hex_val(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => c - b'A' + 10,
    }
}

/// Splits `text` into tokens. Positional bind markers are numbered from 0 in text order.
pub fn tokenize(text: &str) -> Result<Vec<Tok>, LexError> {
    let b = text.as_bytes();
    let mut i = 0;
    let mut out = Vec::new();
    let mut binds = 0usize;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if b[i..].starts_with(b"--") || b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            match text[i + 2..].find("*/") {
                Some(end) => i += 2 + end + 2,
                None => return Err(LexError("unterminated comment".into())),
            }
        } else if c == b'\'' {
            let mut s = Vec::new();
            i += 1;
            loop {
                match b.get(i) {
                    None => return Err(LexError("unterminated string".into())),
                    Some(b'\'') if b.get(i + 1) == Some(&b'\'') => {
                        s.push(b'\'');
                        i += 2;
                    }
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(&x) => {
                        s.push(x);
                        i += 1;
                    }
                }
            }
            let s = String::from_utf8(s).map_err(|_| LexError("string is not UTF-8".into()))?;
            out.push(Tok::Lit(Literal::Str(s)));
        } else if b[i..].starts_with(b"$$") {
            match text[i + 2..].find("$$") {
                Some(end) => {
                    out.push(Tok::Lit(Literal::Str(text[i + 2..i + 2 + end].to_string())));
                    i += 2 + end + 2;
                }
                None => return Err(LexError("unterminated $$ string".into())),
            }
        } else if c == b'"' {
            let mut s = String::new();
            let mut j = i + 1;
            loop {
                match text[j..].find('"') {
                    None => return Err(LexError("unterminated quoted identifier".into())),
                    Some(k) => {
                        s.push_str(&text[j..j + k]);
                        j += k + 1;
                        if b.get(j) == Some(&b'"') {
                            s.push('"');
                            j += 1;
                        } else {
                            break;
                        }
                    }
                }
            }
            out.push(Tok::Quoted(s));
            i = j;
        } else if c == b'?' {
            out.push(Tok::Bind(None, binds));
            binds += 1;
            i += 1;
        } else if c == b':'
            && b.get(i + 1)
                .is_some_and(|x| x.is_ascii_alphabetic() || *x == b'_')
        {
            let start = i + 1;
            i = start;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            out.push(Tok::Bind(Some(text[start..i].to_ascii_lowercase()), binds));
            binds += 1;
        } else if is_uuid_at(&b[i..]) {
            let mut u = [0u8; 16];
            let hex: Vec<u8> = b[i..i + 36].iter().copied().filter(|c| *c != b'-').collect();
            for (k, pair) in hex.chunks(2).enumerate() {
                u[k] = hex_val(pair[0]) << 4 | hex_val(pair[1]);
            }
            out.push(Tok::Lit(Literal::Uuid(u)));
            i += 36;
        } else if c == b'0' && matches!(b.get(i + 1), Some(b'x' | b'X')) {
            let start = i + 2;
            let mut j = start;
            while j < b.len() && b[j].is_ascii_hexdigit() {
                j += 1;
            }
            let digits = &b[start..j];
            if !digits.len().is_multiple_of(2) {
                return Err(LexError("blob constant has an odd number of hex digits".into()));
            }
            out.push(Tok::Lit(Literal::Blob(
                digits
                    .chunks(2)
                    .map(|p| hex_val(p[0]) << 4 | hex_val(p[1]))
                    .collect(),
            )));
            i = j;
        } else if c.is_ascii_digit() || (c == b'-' && b.get(i + 1).is_some_and(u8::is_ascii_digit)) {
            let start = i;
            i += 1;
            let mut float = false;
            while i < b.len() {
                let x = b[i];
                if x.is_ascii_digit() {
                    i += 1;
                } else if x == b'.' && !float && b.get(i + 1).is_none_or(|n| !n.is_ascii_alphabetic()) {
                    float = true;
                    i += 1;
                } else if matches!(x, b'e' | b'E')
                    && (b.get(i + 1).is_some_and(u8::is_ascii_digit)
                        || (matches!(b.get(i + 1), Some(b'-' | b'+'))
                            && b.get(i + 2).is_some_and(u8::is_ascii_digit)))
                {
                    float = true;
                    i += 2;
                } else {
                    break;
                }
            }
            let s = text[start..i].to_string();
            out.push(Tok::Lit(if float { Literal::Float(s) } else { Literal::Int(s) }));
        } else if c == b'-' && text[i + 1..].to_ascii_lowercase().starts_with("infinity") {
            out.push(Tok::Lit(Literal::Float("-Infinity".into())));
            i += 9;
        } else if c == b'-' {
            out.push(Tok::Sym("-"));
            i += 1;
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            let word = text[start..i].to_ascii_lowercase();
            out.push(match word.as_str() {
                "true" => Tok::Lit(Literal::Bool(true)),
                "false" => Tok::Lit(Literal::Bool(false)),
                "null" => Tok::Lit(Literal::Null),
                "nan" => Tok::Lit(Literal::Float("NaN".into())),
                "infinity" => Tok::Lit(Literal::Float("Infinity".into())),
                _ => Tok::Ident(word),
            });
        } else if let Some(sym) = SYMBOLS.iter().find(|s| b[i..].starts_with(s.as_bytes())) {
            out.push(Tok::Sym(sym));
            i += sym.len();
        } else {
            let ch = text[i..].chars().next().unwrap_or('?');
            return Err(LexError(format!("unexpected character {ch:?}")));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_and_markers() {
        let t = tokenize(
            "SELECT \"Col\" FROM ks.t WHERE k = 'it''s' AND u = 01234567-89ab-cdef-0123-456789abcdef \
             AND b = 0xCAFE AND n IN (-1, 2.5e3, ?, :name) -- trailing",
        )
        .unwrap();
        assert_eq!(t[0], Tok::Ident("select".into()));
        assert_eq!(t[1], Tok::Quoted("Col".into()));
        assert!(t.contains(&Tok::Lit(Literal::Str("it's".into()))));
        assert!(t.contains(&Tok::Lit(Literal::Blob(vec![0xca, 0xfe]))));
        assert!(t.contains(&Tok::Lit(Literal::Int("-1".into()))));
        assert!(t.contains(&Tok::Lit(Literal::Float("2.5e3".into()))));
        assert!(t.contains(&Tok::Bind(None, 0)));
        assert!(t.contains(&Tok::Bind(Some("name".into()), 1)));
        assert!(t.iter().any(|x| matches!(x, Tok::Lit(Literal::Uuid(_)))));
        assert!(tokenize("SELECT 'open").is_err());
        assert!(tokenize("SELECT 0xabc").is_err());
    }
}
