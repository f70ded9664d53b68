//! A renderer for the subset of Helm's Go templates that `deploy/helm/sluice` uses, so the
//! chart can be rendered and checked without `helm`: text and `{{ pipelines }}` with trim
//! markers, `if`/`else if`/`else`, `with`, `range` over lists, `define`/`include`,
//! comments, and the functions `quote default toYaml toJson nindent indent trunc trimSuffix
//! printf eq ne not and or contains join`. Anything else is an error, so a chart change that
//! needs more fails here instead of rendering wrongly.

use std::collections::HashMap;

use serde_json::Value;

#[derive(Debug, Clone)]
enum Node {
    Text(String),
    Action(String),
    If(Vec<(String, Vec<Node>)>, Vec<Node>),
    With(String, Vec<Node>, Vec<Node>),
    Range(String, Vec<Node>),
}

/// Parsed templates by name (`define`d ones and files).
#[derive(Default)]
pub struct Templates {
    defined: HashMap<String, Vec<Node>>,
    files: Vec<(String, Vec<Node>)>,
}

enum Token {
    Text(String),
    Action(String),
}

/// Splits a template into text and actions, applying `{{-` and `-}}` trimming and dropping
/// comments.
fn tokenize(src: &str) -> Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let mut rest = src;
    let mut trim_next = false;
    while let Some(start) = rest.find("{{") {
        let mut text = rest[..start].to_string();
        if trim_next {
            text = text.trim_start().to_string();
        }
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or("unclosed {{")?;
        let mut inner = &after[..end];
        if let Some(i) = inner.strip_prefix('-') {
            text = text.trim_end().to_string();
            inner = i;
        }
        trim_next = false;
        if let Some(i) = inner.strip_suffix('-') {
            trim_next = true;
            inner = i;
        }
        out.push(Token::Text(text));
        let inner = inner.trim();
        if !(inner.starts_with("/*") && inner.ends_with("*/")) {
            out.push(Token::Action(inner.to_string()));
        }
        rest = &after[end + 2..];
    }
    let mut text = rest.to_string();
    if trim_next {
        text = text.trim_start().to_string();
    }
    out.push(Token::Text(text));
    Ok(out)
}

/// Parses tokens up to a closing keyword; returns the nodes and the keyword that ended them.
fn parse_until(
    tokens: &mut std::iter::Peekable<std::vec::IntoIter<Token>>,
    defined: &mut HashMap<String, Vec<Node>>,
) -> Result<(Vec<Node>, Option<String>), String> {
    let mut nodes = Vec::new();
    while let Some(t) = tokens.next() {
        match t {
            Token::Text(s) if s.is_empty() => {}
            Token::Text(s) => nodes.push(Node::Text(s)),
            Token::Action(a) => {
                let (word, rest) = a.split_once(char::is_whitespace).unwrap_or((a.as_str(), ""));
                let rest = rest.trim().to_string();
                match word {
                    "end" | "else" => return Ok((nodes, Some(a.clone()))),
                    "if" => {
                        let mut branches = Vec::new();
                        let mut cond = rest;
                        let otherwise = loop {
                            let (body, end) = parse_until(tokens, defined)?;
                            branches.push((cond, body));
                            match end.as_deref() {
                                Some("end") => break Vec::new(),
                                Some("else") => {
                                    let (body, end) = parse_until(tokens, defined)?;
                                    if end.as_deref() != Some("end") {
                                        return Err("if/else without end".into());
                                    }
                                    break body;
                                }
                                Some(e) if e.starts_with("else if ") => {
                                    cond = e["else if ".len()..].trim().to_string()
                                }
                                _ => return Err("if without end".into()),
                            }
                        };
                        nodes.push(Node::If(branches, otherwise));
                    }
                    "with" => {
                        let (body, end) = parse_until(tokens, defined)?;
                        let otherwise = match end.as_deref() {
                            Some("end") => Vec::new(),
                            Some("else") => parse_until(tokens, defined)?.0,
                            _ => return Err("with without end".into()),
                        };
                        nodes.push(Node::With(rest, body, otherwise));
                    }
                    "range" => {
                        let (body, end) = parse_until(tokens, defined)?;
                        if end.as_deref() != Some("end") {
                            return Err("range without end (range/else is not supported)".into());
                        }
                        nodes.push(Node::Range(rest, body));
                    }
                    "define" => {
                        let name = rest.trim_matches('"').to_string();
                        let (body, end) = parse_until(tokens, defined)?;
                        if end.as_deref() != Some("end") {
                            return Err(format!("define {name} without end"));
                        }
                        defined.insert(name, body);
                    }
                    _ => nodes.push(Node::Action(a.clone())),
                }
            }
        }
    }
    Ok((nodes, None))
}

impl Templates {
    /// Adds a template file (helpers define templates; other files render).
    pub fn add(&mut self, name: &str, src: &str) -> Result<(), String> {
        let tokens = tokenize(src).map_err(|e| format!("{name}: {e}"))?;
        let mut it = tokens.into_iter().peekable();
        let (nodes, end) = parse_until(&mut it, &mut self.defined).map_err(|e| format!("{name}: {e}"))?;
        if let Some(e) = end {
            return Err(format!("{name}: unexpected {{{{ {e} }}}}"));
        }
        self.files.push((name.to_string(), nodes));
        Ok(())
    }

    /// Renders every file with `root` (`{"Values": …, "Release": …, "Chart": …}`).
    pub fn render(&self, root: &Value) -> Result<Vec<(String, String)>, String> {
        self.files
            .iter()
            .map(|(name, nodes)| {
                let mut out = String::new();
                self.nodes(nodes, root, root, &mut out)
                    .map_err(|e| format!("{name}: {e}"))?;
                Ok((name.clone(), out))
            })
            .collect()
    }

    fn nodes(&self, nodes: &[Node], dot: &Value, root: &Value, out: &mut String) -> Result<(), String> {
        for n in nodes {
            match n {
                Node::Text(t) => out.push_str(t),
                Node::Action(a) => out.push_str(&print(&self.pipeline(a, dot, root)?)),
                Node::If(branches, otherwise) => {
                    let mut done = false;
                    for (cond, body) in branches {
                        if truthy(&self.pipeline(cond, dot, root)?) {
                            self.nodes(body, dot, root, out)?;
                            done = true;
                            break;
                        }
                    }
                    if !done {
                        self.nodes(otherwise, dot, root, out)?;
                    }
                }
                Node::With(p, body, otherwise) => {
                    let v = self.pipeline(p, dot, root)?;
                    if truthy(&v) {
                        self.nodes(body, &v, root, out)?;
                    } else {
                        self.nodes(otherwise, dot, root, out)?;
                    }
                }
                Node::Range(p, body) => match self.pipeline(p, dot, root)? {
                    Value::Array(items) => {
                        for item in &items {
                            self.nodes(body, item, root, out)?;
                        }
                    }
                    Value::Null => {}
                    other => return Err(format!("range over {other}")),
                },
            }
        }
        Ok(())
    }

    fn pipeline(&self, src: &str, dot: &Value, root: &Value) -> Result<Value, String> {
        let mut value: Option<Value> = None;
        for cmd in split_top(src, '|')? {
            let words = words(cmd.trim())?;
            let (head, args) = words
                .split_first()
                .ok_or_else(|| format!("empty command in {src:?}"))?;
            let mut argv: Vec<Value> = args
                .iter()
                .map(|a| self.operand(a, dot, root))
                .collect::<Result<_, _>>()?;
            if let Some(v) = value.take() {
                argv.push(v);
            }
            value = Some(if is_function(head) {
                self.call(head, argv)?
            } else if argv.is_empty() {
                self.operand(head, dot, root)?
            } else {
                return Err(format!("{head:?} is not a function"));
            });
        }
        value.ok_or_else(|| format!("empty pipeline {src:?}"))
    }

    fn operand(&self, word: &str, dot: &Value, root: &Value) -> Result<Value, String> {
        if let Some(inner) = word.strip_prefix('(').and_then(|w| w.strip_suffix(')')) {
            return self.pipeline(inner, dot, root);
        }
        if word.starts_with('"') {
            return serde_json::from_str(word).map_err(|e| format!("bad string {word}: {e}"));
        }
        if let Ok(n) = word.parse::<i64>() {
            return Ok(Value::from(n));
        }
        match word {
            "true" => return Ok(Value::Bool(true)),
            "false" => return Ok(Value::Bool(false)),
            "." => return Ok(dot.clone()),
            _ => {}
        }
        let (base, path) = if let Some(p) = word.strip_prefix("$.") {
            (root, p)
        } else if word == "$" {
            return Ok(root.clone());
        } else if let Some(p) = word.strip_prefix('.') {
            (dot, p)
        } else {
            return Err(format!("unknown word {word:?}"));
        };
        let mut v = base;
        for key in path.split('.') {
            v = match v.get(key) {
                Some(x) => x,
                None => return Ok(Value::Null),
            };
        }
        Ok(v.clone())
    }

    fn call(&self, f: &str, a: Vec<Value>) -> Result<Value, String> {
        let s = |v: &Value| print(v);
        let int = |v: &Value| v.as_i64().ok_or_else(|| format!("{f}: {v} is not an integer"));
        let want = |n: usize| {
            if a.len() == n {
                Ok(())
            } else {
                Err(format!("{f} takes {n} arguments, got {}", a.len()))
            }
        };
        Ok(match f {
            "quote" => {
                want(1)?;
                Value::String(serde_json::to_string(&s(&a[0])).expect("string"))
            }
            "default" => {
                want(2)?;
                if truthy(&a[1]) {
                    a[1].clone()
                } else {
                    a[0].clone()
                }
            }
            "toYaml" => {
                want(1)?;
                let y = serde_saphyr::to_string(&a[0]).map_err(|e| e.to_string())?;
                Value::String(y.trim_end_matches('\n').to_string())
            }
            "toJson" => {
                want(1)?;
                Value::String(a[0].to_string())
            }
            "indent" | "nindent" => {
                want(2)?;
                let pad = " ".repeat(int(&a[0])? as usize);
                let body = s(&a[1])
                    .lines()
                    .map(|l| format!("{pad}{l}"))
                    .collect::<Vec<_>>()
                    .join("\n");
                Value::String(if f == "nindent" { format!("\n{body}") } else { body })
            }
            "trunc" => {
                want(2)?;
                Value::String(s(&a[1]).chars().take(int(&a[0])? as usize).collect())
            }
            "trimSuffix" => {
                want(2)?;
                let text = s(&a[1]);
                Value::String(text.strip_suffix(&s(&a[0])).unwrap_or(&text).to_string())
            }
            "contains" => {
                want(2)?;
                Value::Bool(s(&a[1]).contains(&s(&a[0])))
            }
            "join" => {
                want(2)?;
                let items = a[1].as_array().cloned().unwrap_or_default();
                Value::String(items.iter().map(s).collect::<Vec<_>>().join(&s(&a[0])))
            }
            "printf" => {
                let fmt = s(a.first().ok_or("printf needs a format")?);
                let mut args = a[1..].iter();
                let mut out = String::new();
                let mut chars = fmt.chars();
                while let Some(c) = chars.next() {
                    if c != '%' {
                        out.push(c);
                        continue;
                    }
                    match chars.next() {
                        Some('%') => out.push('%'),
                        Some('s' | 'd' | 'v') => {
                            out.push_str(&s(args.next().ok_or("printf: too few arguments")?))
                        }
                        other => return Err(format!("printf verb {other:?} is not supported")),
                    }
                }
                Value::String(out)
            }
            "eq" | "ne" => {
                want(2)?;
                Value::Bool((a[0] == a[1]) == (f == "eq"))
            }
            "not" => {
                want(1)?;
                Value::Bool(!truthy(&a[0]))
            }
            "and" => a
                .iter()
                .find(|v| !truthy(v))
                .or(a.last())
                .cloned()
                .unwrap_or(Value::Null),
            "or" => a
                .iter()
                .find(|v| truthy(v))
                .or(a.last())
                .cloned()
                .unwrap_or(Value::Null),
            "include" => {
                want(2)?;
                let name = s(&a[0]);
                let body = self
                    .defined
                    .get(&name)
                    .ok_or_else(|| format!("no template {name:?}"))?;
                let mut out = String::new();
                // Helpers see the context they are given as both `.` and `$`.
                self.nodes(body, &a[1], &a[1], &mut out)?;
                Value::String(out)
            }
            other => return Err(format!("function {other:?} is not supported")),
        })
    }
}

fn is_function(w: &str) -> bool {
    matches!(
        w,
        "quote"
            | "default"
            | "toYaml"
            | "toJson"
            | "indent"
            | "nindent"
            | "trunc"
            | "trimSuffix"
            | "contains"
            | "join"
            | "printf"
            | "eq"
            | "ne"
            | "not"
            | "and"
            | "or"
            | "include"
    )
}

/// Go's truth: false, 0, nil and empty strings, lists and maps are false.
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// How a value prints in a template (Helm prints nothing for a missing value).
fn print(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Splits on `sep` outside strings and parentheses.
fn split_top(src: &str, sep: char) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let (mut depth, mut in_str, mut start) = (0i32, false, 0);
    let mut prev = '\0';
    for (i, c) in src.char_indices() {
        match c {
            '"' if prev != '\\' => in_str = !in_str,
            '(' if !in_str => depth += 1,
            ')' if !in_str => depth -= 1,
            c if c == sep && !in_str && depth == 0 => {
                parts.push(&src[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
        prev = c;
    }
    if depth != 0 || in_str {
        return Err(format!("unbalanced {src:?}"));
    }
    parts.push(&src[start..]);
    Ok(parts)
}

/// The words of a command: operands, strings and parenthesized pipelines.
fn words(src: &str) -> Result<Vec<String>, String> {
    split_top(src, ' ').map(|w| {
        w.into_iter()
            .filter(|w| !w.is_empty())
            .map(str::to_string)
            .collect()
    })
}
