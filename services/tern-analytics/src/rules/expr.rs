//! Compiled rule expressions and their evaluation, with SQL's three-valued logic: a comparison
//! with NULL (a metric the message does not carry, a label the device does not have) is NULL,
//! and a WHERE or HAVING keeps a row only when its condition is TRUE.

use serde::{Deserialize, Serialize};

impl From<&serde_json::Value> for Value {
    /// JSON scalars; objects and arrays are NULL (a rule compares scalars).
    fn from(json: &serde_json::Value) -> Self {
        match json {
            serde_json::Value::Number(n) => n.as_f64().map_or(Value::Null, Value::Number),
            serde_json::Value::String(s) => Value::Text(s.clone()),
            serde_json::Value::Bool(b) => Value::Bool(*b),
            _ => Value::Null,
        }
    }
}

/// A value in a rule: what a column, literal or aggregate yields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    Null,
    Bool(bool),
    Number(f64),
    Text(String),
}

impl Value {
    fn truth(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    fn number(&self) -> Option<f64> {
        match self {
            Value::Number(n) => Some(*n),
            _ => None,
        }
    }

    /// Appends the value's part of a group key: equal values give equal keys, and text is
    /// quoted so that no two key lists give the same string.
    pub fn write_key(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = match self {
            Value::Null => write!(out, "null"),
            Value::Bool(b) => write!(out, "{b}"),
            Value::Number(n) => write!(out, "{n}"),
            Value::Text(t) => return Value::write_text_key(t, out),
        };
    }

    /// [`Value::write_key`] of a text value: quoted and escaped as `{:?}` does. Device ids and
    /// label values are mostly printable ASCII without quotes or backslashes, which `{:?}`
    /// leaves as they are; those skip the formatter (this is on every message's path).
    pub fn write_text_key(text: &str, out: &mut String) {
        use std::fmt::Write;
        if text
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
        {
            out.push('"');
            out.push_str(text);
            out.push('"');
        } else {
            let _ = write!(out, "{text:?}");
        }
    }
}

/// What a row of a stream offers to expressions.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Column {
    /// The device id.
    Device,
    /// The event time, milliseconds since the epoch.
    Ts,
    Metric(String),
    /// `labels.NAME`: a label of the device.
    Label(String),
    /// `twin.reported.a.b` / `twin.desired.a.b`: a field of the device's twin.
    Twin {
        reported: bool,
        path: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Mod,
    Eq,
    NotEq,
    Lt,
    LtEq,
    Gt,
    GtEq,
    And,
    Or,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Literal(Value),
    Column(Column),
    /// The i-th GROUP BY key of a window's group.
    GroupKey(usize),
    /// The i-th aggregate of the rule, over a window.
    Aggregate(usize),
    WindowStart,
    WindowEnd,
    Not(Box<Expr>),
    Negate(Box<Expr>),
    IsNull(Box<Expr>, bool),
    InList(Box<Expr>, Vec<Expr>, bool),
    Binary(Box<Expr>, BinaryOp, Box<Expr>),
}

/// Where an expression is evaluated: one message, or one window of one group.
pub trait Scope {
    fn column(&self, column: &Column) -> Value;
    fn group_key(&self, _index: usize) -> Value {
        Value::Null
    }
    fn aggregate(&self, _index: usize) -> Value {
        Value::Null
    }
    fn window(&self) -> Option<(i64, i64)> {
        None
    }
}

impl Expr {
    pub fn eval(&self, scope: &dyn Scope) -> Value {
        match self {
            Expr::Literal(v) => v.clone(),
            Expr::Column(c) => scope.column(c),
            Expr::GroupKey(i) => scope.group_key(*i),
            Expr::Aggregate(i) => scope.aggregate(*i),
            Expr::WindowStart => scope
                .window()
                .map_or(Value::Null, |w| Value::Number(w.0 as f64)),
            Expr::WindowEnd => scope
                .window()
                .map_or(Value::Null, |w| Value::Number(w.1 as f64)),
            Expr::Not(e) => e
                .eval(scope)
                .truth()
                .map_or(Value::Null, |b| Value::Bool(!b)),
            Expr::Negate(e) => e
                .eval(scope)
                .number()
                .map_or(Value::Null, |n| Value::Number(-n)),
            Expr::IsNull(e, negated) => Value::Bool((e.eval(scope) == Value::Null) != *negated),
            Expr::InList(e, list, negated) => {
                let value = e.eval(scope);
                if value == Value::Null {
                    return Value::Null;
                }
                let found = list.iter().any(|item| {
                    compare(&value, &item.eval(scope)) == Some(std::cmp::Ordering::Equal)
                });
                Value::Bool(found != *negated)
            }
            Expr::Binary(left, op, right) => binary(left.eval(scope), *op, || right.eval(scope)),
        }
    }

    /// Whether the expression reads a column `wanted` accepts.
    pub fn mentions(&self, wanted: &dyn Fn(&Column) -> bool) -> bool {
        match self {
            Expr::Column(c) => wanted(c),
            Expr::Not(e) | Expr::Negate(e) | Expr::IsNull(e, _) => e.mentions(wanted),
            Expr::InList(e, list, _) => {
                e.mentions(wanted) || list.iter().any(|i| i.mentions(wanted))
            }
            Expr::Binary(l, _, r) => l.mentions(wanted) || r.mentions(wanted),
            _ => false,
        }
    }

    /// Whether a condition holds: TRUE only, never NULL.
    pub fn holds(&self, scope: &dyn Scope) -> bool {
        self.eval(scope) == Value::Bool(true)
    }
}

fn compare(a: &Value, b: &Value) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.partial_cmp(y),
        (Value::Text(x), Value::Text(y)) => Some(x.cmp(y)),
        (Value::Bool(x), Value::Bool(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

fn binary(left: Value, op: BinaryOp, right: impl FnOnce() -> Value) -> Value {
    use std::cmp::Ordering::*;
    match op {
        // Three-valued logic: FALSE AND NULL is FALSE, TRUE OR NULL is TRUE.
        BinaryOp::And => match (left.truth(), right().truth()) {
            (Some(false), _) | (_, Some(false)) => Value::Bool(false),
            (Some(true), Some(true)) => Value::Bool(true),
            _ => Value::Null,
        },
        BinaryOp::Or => match (left.truth(), right().truth()) {
            (Some(true), _) | (_, Some(true)) => Value::Bool(true),
            (Some(false), Some(false)) => Value::Bool(false),
            _ => Value::Null,
        },
        BinaryOp::Eq
        | BinaryOp::NotEq
        | BinaryOp::Lt
        | BinaryOp::LtEq
        | BinaryOp::Gt
        | BinaryOp::GtEq => {
            let Some(ordering) = compare(&left, &right()) else {
                return Value::Null;
            };
            Value::Bool(match op {
                BinaryOp::Eq => ordering == Equal,
                BinaryOp::NotEq => ordering != Equal,
                BinaryOp::Lt => ordering == Less,
                BinaryOp::LtEq => ordering != Greater,
                BinaryOp::Gt => ordering == Greater,
                _ => ordering != Less,
            })
        }
        BinaryOp::Add | BinaryOp::Sub | BinaryOp::Mul | BinaryOp::Div | BinaryOp::Mod => {
            let (Some(x), Some(y)) = (left.number(), right().number()) else {
                return Value::Null;
            };
            let result = match op {
                BinaryOp::Add => x + y,
                BinaryOp::Sub => x - y,
                BinaryOp::Mul => x * y,
                BinaryOp::Div => x / y,
                _ => x % y,
            };
            // Division by zero is NULL, as in SQL, rather than infinity.
            if result.is_finite() {
                Value::Number(result)
            } else {
                Value::Null
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_keys_are_quoted_as_debug_formatting_does() {
        for text in [
            "pump-7",
            "",
            "a b~",
            "say \"hi\"",
            "back\\slash",
            "tab\t",
            "ünï",
            "\u{7f}",
        ] {
            let mut key = String::new();
            Value::write_text_key(text, &mut key);
            assert_eq!(key, format!("{text:?}"), "{text}");
        }
    }

    struct Row(Option<f64>);
    impl Scope for Row {
        fn column(&self, _: &Column) -> Value {
            self.0.map_or(Value::Null, Value::Number)
        }
    }

    fn temp_gt(n: f64) -> Expr {
        Expr::Binary(
            Box::new(Expr::Column(Column::Metric("temp".into()))),
            BinaryOp::Gt,
            Box::new(Expr::Literal(Value::Number(n))),
        )
    }

    #[test]
    fn null_propagates_and_and_or_follow_three_valued_logic() {
        let missing = Row(None);
        assert_eq!(temp_gt(1.0).eval(&missing), Value::Null);
        assert!(!temp_gt(1.0).holds(&missing));
        let never = Expr::Literal(Value::Bool(false));
        let always = Expr::Literal(Value::Bool(true));
        let and = Expr::Binary(Box::new(temp_gt(1.0)), BinaryOp::And, Box::new(never));
        assert_eq!(and.eval(&missing), Value::Bool(false));
        let or = Expr::Binary(Box::new(temp_gt(1.0)), BinaryOp::Or, Box::new(always));
        assert_eq!(or.eval(&missing), Value::Bool(true));
        let not = Expr::Not(Box::new(temp_gt(1.0)));
        assert_eq!(not.eval(&missing), Value::Null);
        assert!(
            Expr::IsNull(Box::new(Expr::Column(Column::Metric("t".into()))), false).holds(&missing)
        );
    }

    #[test]
    fn arithmetic_is_numeric_and_division_by_zero_is_null() {
        let row = Row(Some(10.0));
        let div = |by: f64| {
            Expr::Binary(
                Box::new(Expr::Column(Column::Metric("x".into()))),
                BinaryOp::Div,
                Box::new(Expr::Literal(Value::Number(by))),
            )
        };
        assert_eq!(div(4.0).eval(&row), Value::Number(2.5));
        assert_eq!(div(0.0).eval(&row), Value::Null);
        let text = Expr::Binary(
            Box::new(Expr::Literal(Value::Text("a".into()))),
            BinaryOp::Add,
            Box::new(Expr::Literal(Value::Number(1.0))),
        );
        assert_eq!(text.eval(&row), Value::Null);
    }
}
