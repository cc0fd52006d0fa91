//! The rule language: `select` and `where` over a push envelope (JSON).
//!
//! ```text
//! select: notify_data.header.device_id AS id, notify_data.body.services[0].properties.temp * 1.8 + 32 AS f
//! where:  notify_data.body.services[0].properties.temp > 30 AND notify_data.header.product_id IN ('a', 'b')
//! ```
//! Paths with `.key` and `[n]`, aliases, `*`, arithmetic, comparisons, AND/OR/NOT, LIKE, IN, BETWEEN,
//! IS [NOT] NULL and functions (string, math, time). A missing path is NULL; comparisons with NULL
//! are false, as in SQL. Pure: "now" is passed in.

use serde_json::{Map, Number, Value};

use crate::RulesError;

/// A parsed expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Literal(Value),
    Path(Vec<Segment>),
    Unary(UnaryOp, Box<Expr>),
    Binary(BinaryOp, Box<Expr>, Box<Expr>),
    Like {
        expr: Box<Expr>,
        pattern: Box<Expr>,
        negated: bool,
    },
    In {
        expr: Box<Expr>,
        list: Vec<Expr>,
        negated: bool,
    },
    Between {
        expr: Box<Expr>,
        low: Box<Expr>,
        high: Box<Expr>,
        negated: bool,
    },
    IsNull {
        expr: Box<Expr>,
        negated: bool,
    },
    Call {
        name: String,
        args: Vec<Expr>,
    },
}

/// One step of a path.
#[derive(Debug, Clone, PartialEq)]
pub enum Segment {
    Key(String),
    Index(usize),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UnaryOp {
    Neg,
    Not,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BinaryOp {
    Or,
    And,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Add,
    Sub,
    Mul,
    Div,
    Rem,
}

/// One item of a select list.
#[derive(Debug, Clone, PartialEq)]
pub enum SelectItem {
    /// `*`: every field of the envelope.
    All,
    Expr {
        expr: Expr,
        name: String,
    },
}

/// A compiled rule: its select list and optional condition.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub select: Vec<SelectItem>,
    pub condition: Option<Expr>,
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Number(f64, bool),
    Str(String),
    Sym(&'static str),
}

const FUNCTIONS: &[&str] = &[
    "concat",
    "upper",
    "lower",
    "length",
    "substring",
    "trim",
    "replace",
    "startswith",
    "endswith",
    "abs",
    "round",
    "floor",
    "ceil",
    "power",
    "sqrt",
    "mod",
    "now",
    "format_time",
    "coalesce",
    "to_number",
    "to_string",
];

struct Lexer<'a> {
    chars: Vec<(usize, char)>,
    pos: usize,
    clause: &'static str,
    _text: &'a str,
}

fn syntax(clause: &'static str, position: usize, message: impl Into<String>) -> RulesError {
    RulesError::Syntax {
        clause,
        position,
        message: message.into(),
    }
}

impl<'a> Lexer<'a> {
    fn new(text: &'a str, clause: &'static str) -> Self {
        Lexer {
            chars: text.chars().enumerate().collect(),
            pos: 0,
            clause,
            _text: text,
        }
    }

    /// All tokens with their 1-based character positions.
    fn tokens(mut self) -> Result<Vec<(Token, usize)>, RulesError> {
        let mut out = Vec::new();
        while let Some(&(i, c)) = self.chars.get(self.pos) {
            let at = i + 1;
            if c.is_whitespace() {
                self.pos += 1;
            } else if c.is_ascii_digit() {
                out.push((self.number(at)?, at));
            } else if c == '\'' {
                out.push((Token::Str(self.quoted('\'', at)?), at));
            } else if c == '"' || c == '`' {
                out.push((Token::Ident(self.quoted(c, at)?), at));
            } else if c.is_alphabetic() || c == '_' || c == '$' {
                out.push((Token::Ident(self.word()), at));
            } else {
                out.push((Token::Sym(self.symbol(at)?), at));
            }
        }
        Ok(out)
    }

    fn peek(&self, offset: usize) -> Option<char> {
        self.chars.get(self.pos + offset).map(|(_, c)| *c)
    }

    fn number(&mut self, at: usize) -> Result<Token, RulesError> {
        let start = self.pos;
        while self.peek(0).is_some_and(|c| c.is_ascii_digit() || c == '.') {
            self.pos += 1;
        }
        let text: String = self.chars[start..self.pos].iter().map(|(_, c)| c).collect();
        let value = text
            .parse::<f64>()
            .map_err(|_| syntax(self.clause, at, format!("bad number '{text}'")))?;
        Ok(Token::Number(value, !text.contains('.')))
    }

    fn quoted(&mut self, quote: char, at: usize) -> Result<String, RulesError> {
        self.pos += 1;
        let mut text = String::new();
        loop {
            match self.peek(0) {
                None => return Err(syntax(self.clause, at, "unterminated quote")),
                Some(c) if c == quote && self.peek(1) == Some(quote) => {
                    text.push(c);
                    self.pos += 2;
                }
                Some(c) if c == quote => {
                    self.pos += 1;
                    return Ok(text);
                }
                Some(c) => {
                    text.push(c);
                    self.pos += 1;
                }
            }
        }
    }

    fn word(&mut self) -> String {
        let start = self.pos;
        while self
            .peek(0)
            .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$' || c == '-')
        {
            self.pos += 1;
        }
        self.chars[start..self.pos].iter().map(|(_, c)| c).collect()
    }

    fn symbol(&mut self, at: usize) -> Result<&'static str, RulesError> {
        let two: String = [self.peek(0), self.peek(1)].iter().flatten().collect();
        for sym in ["<=", ">=", "<>", "!="] {
            if two == sym {
                self.pos += 2;
                return Ok(sym);
            }
        }
        let one = self.peek(0).unwrap_or(' ');
        let sym = match one {
            '=' => "=",
            '<' => "<",
            '>' => ">",
            '+' => "+",
            '-' => "-",
            '*' => "*",
            '/' => "/",
            '%' => "%",
            '(' => "(",
            ')' => ")",
            '[' => "[",
            ']' => "]",
            ',' => ",",
            '.' => ".",
            other => {
                return Err(syntax(
                    self.clause,
                    at,
                    format!("unexpected character '{other}'"),
                ));
            }
        };
        self.pos += 1;
        Ok(sym)
    }
}

struct Parser {
    tokens: Vec<(Token, usize)>,
    pos: usize,
    end: usize,
    clause: &'static str,
}

fn keyword(token: Option<&Token>, word: &str) -> bool {
    matches!(token, Some(Token::Ident(w)) if w.eq_ignore_ascii_case(word))
}

impl Parser {
    fn new(text: &str, clause: &'static str) -> Result<Parser, RulesError> {
        let tokens = Lexer::new(text, clause).tokens()?;
        Ok(Parser {
            tokens,
            pos: 0,
            end: text.chars().count() + 1,
            clause,
        })
    }

    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos).map(|(t, _)| t)
    }

    fn position(&self) -> usize {
        self.tokens.get(self.pos).map_or(self.end, |(_, p)| *p)
    }

    fn error<T>(&self, message: impl Into<String>) -> Result<T, RulesError> {
        Err(syntax(self.clause, self.position(), message))
    }

    fn eat_sym(&mut self, sym: &str) -> bool {
        if matches!(self.peek(), Some(Token::Sym(s)) if *s == sym) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn eat_keyword(&mut self, word: &str) -> bool {
        if keyword(self.peek(), word) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect_sym(&mut self, sym: &str) -> Result<(), RulesError> {
        if self.eat_sym(sym) {
            Ok(())
        } else {
            self.error(format!("expected '{sym}'"))
        }
    }

    fn done(&self) -> Result<(), RulesError> {
        match self.peek() {
            None => Ok(()),
            Some(token) => self.error(format!("unexpected {}", describe(token))),
        }
    }

    fn expr(&mut self) -> Result<Expr, RulesError> {
        let mut left = self.and()?;
        while self.eat_keyword("or") {
            left = Expr::Binary(BinaryOp::Or, Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, RulesError> {
        let mut left = self.not()?;
        while self.eat_keyword("and") {
            left = Expr::Binary(BinaryOp::And, Box::new(left), Box::new(self.not()?));
        }
        Ok(left)
    }

    fn not(&mut self) -> Result<Expr, RulesError> {
        if self.eat_keyword("not") {
            return Ok(Expr::Unary(UnaryOp::Not, Box::new(self.not()?)));
        }
        self.comparison()
    }

    fn comparison(&mut self) -> Result<Expr, RulesError> {
        let left = self.additive()?;
        let ops = [
            ("=", BinaryOp::Eq),
            ("!=", BinaryOp::Ne),
            ("<>", BinaryOp::Ne),
            ("<=", BinaryOp::Le),
            (">=", BinaryOp::Ge),
            ("<", BinaryOp::Lt),
            (">", BinaryOp::Gt),
        ];
        for (sym, op) in ops {
            if self.eat_sym(sym) {
                return Ok(Expr::Binary(op, Box::new(left), Box::new(self.additive()?)));
            }
        }
        if self.eat_keyword("is") {
            let negated = self.eat_keyword("not");
            if !self.eat_keyword("null") {
                return self.error("expected NULL after IS");
            }
            return Ok(Expr::IsNull {
                expr: Box::new(left),
                negated,
            });
        }
        let negated = self.eat_keyword("not");
        if self.eat_keyword("like") {
            return Ok(Expr::Like {
                expr: Box::new(left),
                pattern: Box::new(self.additive()?),
                negated,
            });
        }
        if self.eat_keyword("in") {
            self.expect_sym("(")?;
            let mut list = vec![self.expr()?];
            while self.eat_sym(",") {
                list.push(self.expr()?);
            }
            self.expect_sym(")")?;
            return Ok(Expr::In {
                expr: Box::new(left),
                list,
                negated,
            });
        }
        if self.eat_keyword("between") {
            let low = self.additive()?;
            if !self.eat_keyword("and") {
                return self.error("expected AND in BETWEEN");
            }
            let high = self.additive()?;
            return Ok(Expr::Between {
                expr: Box::new(left),
                low: Box::new(low),
                high: Box::new(high),
                negated,
            });
        }
        if negated {
            return self.error("expected LIKE, IN or BETWEEN after NOT");
        }
        Ok(left)
    }

    fn additive(&mut self) -> Result<Expr, RulesError> {
        let mut left = self.multiplicative()?;
        loop {
            let op = if self.eat_sym("+") {
                BinaryOp::Add
            } else if self.eat_sym("-") {
                BinaryOp::Sub
            } else {
                return Ok(left);
            };
            left = Expr::Binary(op, Box::new(left), Box::new(self.multiplicative()?));
        }
    }

    fn multiplicative(&mut self) -> Result<Expr, RulesError> {
        let mut left = self.unary()?;
        loop {
            let op = if self.eat_sym("*") {
                BinaryOp::Mul
            } else if self.eat_sym("/") {
                BinaryOp::Div
            } else if self.eat_sym("%") {
                BinaryOp::Rem
            } else {
                return Ok(left);
            };
            left = Expr::Binary(op, Box::new(left), Box::new(self.unary()?));
        }
    }

    fn unary(&mut self) -> Result<Expr, RulesError> {
        if self.eat_sym("-") {
            return Ok(Expr::Unary(UnaryOp::Neg, Box::new(self.unary()?)));
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Expr, RulesError> {
        let Some(token) = self.peek().cloned() else {
            return self.error("unexpected end of input");
        };
        match token {
            Token::Number(n, integral) => {
                self.pos += 1;
                Ok(Expr::Literal(number(n, integral)))
            }
            Token::Str(s) => {
                self.pos += 1;
                Ok(Expr::Literal(Value::String(s)))
            }
            Token::Sym("(") => {
                self.pos += 1;
                let inner = self.expr()?;
                self.expect_sym(")")?;
                Ok(inner)
            }
            Token::Ident(word) => self.word(word),
            other => self.error(format!("unexpected {}", describe(&other))),
        }
    }

    fn word(&mut self, word: String) -> Result<Expr, RulesError> {
        let lower = word.to_ascii_lowercase();
        let literal = match lower.as_str() {
            "true" => Some(Value::Bool(true)),
            "false" => Some(Value::Bool(false)),
            "null" => Some(Value::Null),
            _ => None,
        };
        if let Some(value) = literal {
            self.pos += 1;
            return Ok(Expr::Literal(value));
        }
        if matches!(self.tokens.get(self.pos + 1), Some((Token::Sym("("), _))) {
            return self.call(lower);
        }
        self.path()
    }

    fn call(&mut self, name: String) -> Result<Expr, RulesError> {
        if !FUNCTIONS.contains(&name.as_str()) {
            return self.error(format!("unknown function '{name}'"));
        }
        self.pos += 2;
        let mut args = Vec::new();
        if !self.eat_sym(")") {
            args.push(self.expr()?);
            while self.eat_sym(",") {
                args.push(self.expr()?);
            }
            self.expect_sym(")")?;
        }
        Ok(Expr::Call { name, args })
    }

    fn path(&mut self) -> Result<Expr, RulesError> {
        let mut segments = Vec::new();
        let Some(Token::Ident(first)) = self.peek().cloned() else {
            return self.error("expected a field name");
        };
        self.pos += 1;
        segments.push(Segment::Key(first));
        loop {
            if self.eat_sym(".") {
                match self.peek().cloned() {
                    Some(Token::Ident(key)) => {
                        self.pos += 1;
                        segments.push(Segment::Key(key));
                    }
                    _ => return self.error("expected a field name after '.'"),
                }
            } else if self.eat_sym("[") {
                match self.peek().cloned() {
                    Some(Token::Number(n, true)) if n >= 0.0 => {
                        self.pos += 1;
                        segments.push(Segment::Index(n as usize));
                    }
                    _ => return self.error("expected an array index"),
                }
                self.expect_sym("]")?;
            } else {
                return Ok(Expr::Path(segments));
            }
        }
    }

    fn select_list(&mut self) -> Result<Vec<SelectItem>, RulesError> {
        let mut items = vec![self.select_item()?];
        while self.eat_sym(",") {
            items.push(self.select_item()?);
        }
        self.done()?;
        Ok(items)
    }

    fn select_item(&mut self) -> Result<SelectItem, RulesError> {
        if self.eat_sym("*") {
            return Ok(SelectItem::All);
        }
        let start = self.pos;
        let expr = self.expr()?;
        let name = if self.eat_keyword("as") {
            match self.peek().cloned() {
                Some(Token::Ident(alias)) => {
                    self.pos += 1;
                    alias
                }
                _ => return self.error("expected an alias after AS"),
            }
        } else {
            default_name(&expr, &self.tokens[start..self.pos])
        };
        Ok(SelectItem::Expr { expr, name })
    }
}

fn describe(token: &Token) -> String {
    match token {
        Token::Ident(w) => format!("'{w}'"),
        Token::Number(n, _) => format!("number {n}"),
        Token::Str(s) => format!("string '{s}'"),
        Token::Sym(s) => format!("'{s}'"),
    }
}

/// A select item without alias is named after its last path key, else after its text.
fn default_name(expr: &Expr, tokens: &[(Token, usize)]) -> String {
    if let Expr::Path(segments) = expr
        && let Some(Segment::Key(key)) =
            segments.iter().rev().find(|s| matches!(s, Segment::Key(_)))
    {
        return key.clone();
    }
    tokens
        .iter()
        .map(|(t, _)| match t {
            Token::Ident(w) => w.clone(),
            Token::Number(n, _) => n.to_string(),
            Token::Str(s) => format!("'{s}'"),
            Token::Sym(s) => (*s).to_owned(),
        })
        .collect()
}

pub(crate) fn number(n: f64, integral: bool) -> Value {
    if integral && n.abs() < 9.0e15 {
        Value::Number(Number::from(n as i64))
    } else {
        Number::from_f64(n).map_or(Value::Null, Value::Number)
    }
}

/// Compiles a rule's `select` (empty = `*`) and `where` (empty = always).
pub fn compile(select: Option<&str>, condition: Option<&str>) -> Result<Rule, RulesError> {
    let select = match select.map(str::trim).filter(|s| !s.is_empty()) {
        None => vec![SelectItem::All],
        Some(text) => Parser::new(text, "select")?.select_list()?,
    };
    let condition = match condition.map(str::trim).filter(|s| !s.is_empty()) {
        None => None,
        Some(text) => {
            let mut parser = Parser::new(text, "where")?;
            let expr = parser.expr()?;
            parser.done()?;
            Some(expr)
        }
    };
    Ok(Rule { select, condition })
}

impl Rule {
    /// Whether the envelope passes the condition.
    pub fn matches(&self, envelope: &Value, now_ms: i64) -> bool {
        self.condition
            .as_ref()
            .is_none_or(|c| truthy(&eval(c, envelope, now_ms)))
    }

    /// Whether the rule forwards the envelope as it is (`SELECT *` or no select).
    pub fn selects_all(&self) -> bool {
        matches!(self.select.as_slice(), [SelectItem::All])
    }

    /// Whether the rule neither tests nor picks values: it forwards every envelope whole, so the
    /// envelope can be written around the report's stored text without reading its values.
    pub fn reads_no_values(&self) -> bool {
        self.condition.is_none() && self.selects_all()
    }

    /// The selected object.
    pub fn project(&self, envelope: &Value, now_ms: i64) -> Value {
        let mut out = Map::new();
        for item in &self.select {
            match item {
                SelectItem::All => {
                    if let Value::Object(fields) = envelope {
                        out.extend(fields.iter().map(|(k, v)| (k.clone(), v.clone())));
                    }
                }
                SelectItem::Expr { expr, name } => {
                    out.insert(name.clone(), eval(expr, envelope, now_ms));
                }
            }
        }
        Value::Object(out)
    }
}

#[path = "sql_eval.rs"]
mod eval;

pub use eval::eval;
use eval::truthy;

#[cfg(test)]
#[path = "sql_tests.rs"]
mod tests;
