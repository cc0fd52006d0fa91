//! Evaluation of rule SQL expressions over a JSON envelope, with SQL's NULL semantics.

use serde_json::Value;

use super::{BinaryOp, Expr, Segment, UnaryOp, number};

pub(super) fn truthy(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::Null => false,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        _ => true,
    }
}

fn lookup<'a>(root: &'a Value, segments: &[Segment]) -> Option<&'a Value> {
    segments.iter().try_fold(root, |v, s| match s {
        Segment::Key(k) => v.get(k),
        Segment::Index(i) => v.get(*i),
    })
}

fn num(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        Value::Bool(b) => Some(f64::from(u8::from(*b))),
        _ => None,
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn float(f: f64) -> Value {
    number(f, f.fract() == 0.0)
}

/// SQL comparison: numbers numerically (strings that look like numbers too), strings lexically,
/// anything with NULL is unknown (`None`).
fn compare(a: &Value, b: &Value) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (Value::Null, _) | (_, Value::Null) => None,
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        (Value::Bool(x), Value::Bool(y)) => Some(x.cmp(y)),
        _ => match (num(a), num(b)) {
            (Some(x), Some(y)) => x.partial_cmp(&y),
            _ => (a == b).then_some(std::cmp::Ordering::Equal),
        },
    }
}

pub(super) fn like(value: &str, pattern: &str) -> bool {
    let v: Vec<char> = value.chars().collect();
    let p: Vec<char> = pattern.chars().collect();
    // Dynamic programming over (value index, pattern index): no backtracking blow-up.
    let mut row = vec![false; v.len() + 1];
    row[0] = true;
    for pc in &p {
        let mut next = vec![false; v.len() + 1];
        if *pc == '%' {
            let mut seen = false;
            for i in 0..=v.len() {
                seen |= row[i];
                next[i] = seen;
            }
        } else {
            for i in 1..=v.len() {
                next[i] = row[i - 1] && (*pc == '_' || *pc == v[i - 1]);
            }
        }
        row = next;
    }
    row[v.len()]
}

fn arithmetic(op: BinaryOp, a: &Value, b: &Value) -> Value {
    if op == BinaryOp::Add
        && (a.is_string() || b.is_string())
        && (num(a).is_none() || num(b).is_none())
    {
        return Value::String(text(a) + &text(b));
    }
    let (Some(x), Some(y)) = (num(a), num(b)) else {
        return Value::Null;
    };
    match op {
        BinaryOp::Add => float(x + y),
        BinaryOp::Sub => float(x - y),
        BinaryOp::Mul => float(x * y),
        BinaryOp::Div if y != 0.0 => float(x / y),
        BinaryOp::Rem if y != 0.0 => float(x % y),
        _ => Value::Null,
    }
}

fn binary(op: BinaryOp, left: &Expr, right: &Expr, root: &Value, now: i64) -> Value {
    use std::cmp::Ordering::*;
    match op {
        BinaryOp::And => {
            Value::Bool(truthy(&eval(left, root, now)) && truthy(&eval(right, root, now)))
        }
        BinaryOp::Or => {
            Value::Bool(truthy(&eval(left, root, now)) || truthy(&eval(right, root, now)))
        }
        _ => {
            let (a, b) = (eval(left, root, now), eval(right, root, now));
            let ordering = compare(&a, &b);
            match op {
                BinaryOp::Eq => Value::Bool(ordering == Some(Equal)),
                BinaryOp::Ne => Value::Bool(ordering.is_some_and(|o| o != Equal)),
                BinaryOp::Lt => Value::Bool(ordering == Some(Less)),
                BinaryOp::Le => Value::Bool(matches!(ordering, Some(Less | Equal))),
                BinaryOp::Gt => Value::Bool(ordering == Some(Greater)),
                BinaryOp::Ge => Value::Bool(matches!(ordering, Some(Greater | Equal))),
                arith => arithmetic(arith, &a, &b),
            }
        }
    }
}

/// Evaluates an expression against the envelope.
pub fn eval(expr: &Expr, root: &Value, now: i64) -> Value {
    match expr {
        Expr::Literal(v) => v.clone(),
        Expr::Path(segments) => lookup(root, segments).cloned().unwrap_or(Value::Null),
        Expr::Unary(UnaryOp::Not, e) => Value::Bool(!truthy(&eval(e, root, now))),
        Expr::Unary(UnaryOp::Neg, e) => num(&eval(e, root, now)).map_or(Value::Null, |n| float(-n)),
        Expr::Binary(op, l, r) => binary(*op, l, r, root, now),
        Expr::Like {
            expr,
            pattern,
            negated,
        } => {
            let (v, p) = (eval(expr, root, now), eval(pattern, root, now));
            Value::Bool(!v.is_null() && like(&text(&v), &text(&p)) != *negated)
        }
        Expr::In {
            expr,
            list,
            negated,
        } => {
            let v = eval(expr, root, now);
            let found = list
                .iter()
                .any(|item| compare(&v, &eval(item, root, now)) == Some(std::cmp::Ordering::Equal));
            Value::Bool(!v.is_null() && found != *negated)
        }
        Expr::Between {
            expr,
            low,
            high,
            negated,
        } => {
            let v = eval(expr, root, now);
            let above = compare(&v, &eval(low, root, now)).is_some_and(|o| o.is_ge());
            let below = compare(&v, &eval(high, root, now)).is_some_and(|o| o.is_le());
            Value::Bool(!v.is_null() && (above && below) != *negated)
        }
        Expr::IsNull { expr, negated } => Value::Bool(eval(expr, root, now).is_null() != *negated),
        Expr::Call { name, args } => {
            let values: Vec<Value> = args.iter().map(|a| eval(a, root, now)).collect();
            call(name, &values, now)
        }
    }
}

fn call(name: &str, args: &[Value], now: i64) -> Value {
    let arg = |i: usize| args.get(i).cloned().unwrap_or(Value::Null);
    let n = |i: usize| num(&arg(i));
    let s = |i: usize| text(&arg(i));
    match name {
        "concat" => Value::String(args.iter().map(text).collect()),
        "upper" => Value::String(s(0).to_uppercase()),
        "lower" => Value::String(s(0).to_lowercase()),
        "trim" => Value::String(s(0).trim().to_owned()),
        "length" => Value::from(s(0).chars().count()),
        "substring" => {
            let chars: Vec<char> = s(0).chars().collect();
            let start = n(1).unwrap_or(0.0).max(0.0) as usize;
            let len = n(2).map_or(chars.len(), |l| l.max(0.0) as usize);
            Value::String(chars.iter().skip(start).take(len).collect())
        }
        "replace" => Value::String(s(0).replace(&s(1), &s(2))),
        "startswith" => Value::Bool(s(0).starts_with(&s(1))),
        "endswith" => Value::Bool(s(0).ends_with(&s(1))),
        "abs" => n(0).map_or(Value::Null, |x| float(x.abs())),
        "round" => match (n(0), n(1).unwrap_or(0.0)) {
            (Some(x), digits) => {
                let scale = 10f64.powi(digits as i32);
                float((x * scale).round() / scale)
            }
            _ => Value::Null,
        },
        "floor" => n(0).map_or(Value::Null, |x| float(x.floor())),
        "ceil" => n(0).map_or(Value::Null, |x| float(x.ceil())),
        "power" => n(0)
            .zip(n(1))
            .map_or(Value::Null, |(x, y)| float(x.powf(y))),
        "sqrt" => n(0)
            .filter(|x| *x >= 0.0)
            .map_or(Value::Null, |x| float(x.sqrt())),
        "mod" => arithmetic(BinaryOp::Rem, &arg(0), &arg(1)),
        "now" => Value::from(now),
        "format_time" => Value::String(ioda_types::time::format_compact(
            n(0).map_or(now, |x| x as i64),
        )),
        "coalesce" => args
            .iter()
            .find(|v| !v.is_null())
            .cloned()
            .unwrap_or(Value::Null),
        "to_number" => n(0).map_or(Value::Null, float),
        "to_string" => Value::String(s(0)),
        _ => Value::Null,
    }
}
