//! Rule SQL: parsed with sqlparser, then compiled into a [`Plan`] that the engine runs. Anything
//! the engine cannot run is refused here, at save time, with the line and column of the
//! offending token.
//!
//! The language: `SELECT items FROM telemetry [WHERE condition]`, optionally windowed with
//! `GROUP BY keys, TUMBLE(ts, INTERVAL '1' MINUTE)` or `HOP(ts, slide, size)` and `HAVING`.
//! Columns are metric names, `device`, `ts` and `labels.NAME`; windows add `window_start`,
//! `window_end` and the aggregates `count`, `sum`, `avg`, `min`, `max`.

use sqlparser::ast::{self, Spanned};
use sqlparser::dialect::GenericDialect;
use sqlparser::parser::Parser;
use thiserror::Error;

use super::expr::{BinaryOp, Column, Expr, Value};

/// A rule that cannot run, with where in the SQL the problem is (1-based).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{message} at line {line}, column {column}")]
pub struct SqlError {
    pub message: String,
    pub line: u64,
    pub column: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggregateFn {
    Count,
    Sum,
    Avg,
    Min,
    Max,
    /// `percentile(x, p)` (and `median(x)`), p in parts per million.
    Percentile(u32),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    pub function: AggregateFn,
    /// `None` for `count(*)`.
    pub argument: Option<Expr>,
}

/// Windows of `size_ms` starting every `slide_ms` (equal for a tumbling window).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSpec {
    pub size_ms: i64,
    pub slide_ms: i64,
}

/// What turns a group's messages into rows.
#[derive(Debug, Clone, PartialEq)]
pub enum Trigger {
    /// `TUMBLE` / `HOP`: a row per window when it closes, with aggregates.
    Window(WindowSpec),
    /// `SESSION(ts, gap)`: a row per burst of messages no further apart than the gap, with
    /// aggregates.
    Session { gap_ms: i64 },
    /// `ABSENCE(INTERVAL)`: a row when no message has arrived from the group for the interval.
    Absence { timeout_ms: i64 },
    /// `HYSTERESIS(enter, leave)`: a row when `enter` holds while the group is off, and a
    /// clearing row when `leave` holds while it is on.
    Hysteresis { enter: Expr, leave: Expr },
    /// `SEQUENCE(first, then, INTERVAL)`: a row when a message meeting `then` follows one
    /// meeting `first` within the interval (message time).
    Sequence {
        first: Expr,
        then: Expr,
        within_ms: i64,
    },
}

/// A grouped rule: a window or pattern per group.
#[derive(Debug, Clone, PartialEq)]
pub struct Windowed {
    pub trigger: Trigger,
    /// Group keys (`device`, `labels.NAME`), evaluated on each message.
    pub keys: Vec<Column>,
    pub aggregates: Vec<Aggregate>,
    pub having: Option<Expr>,
}

/// What a rule computes.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The condition a message must meet (before any window).
    pub filter: Option<Expr>,
    /// Output columns: name and expression. Empty with `select_all` (`SELECT *`).
    pub columns: Vec<(String, Expr)>,
    pub select_all: bool,
    pub windowed: Option<Windowed>,
    /// The event-log stream the rule reads (`FROM`).
    pub stream: &'static str,
}

impl Plan {
    /// Whether evaluating the rule needs the device's labels.
    pub fn uses_labels(&self) -> bool {
        self.mentions(&|c| matches!(c, Column::Label(_)))
    }

    /// Whether evaluating the rule needs the device's twin.
    pub fn uses_twin(&self) -> bool {
        self.mentions(&|c| matches!(c, Column::Twin { .. }))
    }

    /// Whether any expression or key of the rule reads a column `wanted` accepts.
    fn mentions(&self, wanted: &dyn Fn(&Column) -> bool) -> bool {
        let mut exprs: Vec<&Expr> = self
            .filter
            .iter()
            .chain(self.columns.iter().map(|(_, e)| e))
            .collect();
        if let Some(w) = &self.windowed {
            if w.keys.iter().any(wanted) {
                return true;
            }
            exprs.extend(w.having.iter());
            exprs.extend(w.aggregates.iter().filter_map(|a| a.argument.as_ref()));
            match &w.trigger {
                Trigger::Hysteresis { enter, leave } => exprs.extend([enter, leave]),
                Trigger::Sequence { first, then, .. } => exprs.extend([first, then]),
                Trigger::Window(_) | Trigger::Session { .. } | Trigger::Absence { .. } => {}
            }
        }
        exprs.into_iter().any(|e| e.mentions(wanted))
    }

    /// Whether each output row belongs to one device: `command:NAME` has a target, and the
    /// rule's work splits by the log's partitions (a device's messages are all in one).
    pub fn per_device(&self) -> bool {
        self.windowed
            .as_ref()
            .is_none_or(|w| w.keys.contains(&Column::Device))
    }
}

/// The event-log streams a rule can read.
pub const STREAMS: [&str; 3] = ["telemetry", "event", "lifecycle"];

pub fn compile(sql: &str) -> Result<Plan, SqlError> {
    let statements =
        Parser::parse_sql(&GenericDialect {}, sql).map_err(|e| parse_error(sql, &e.to_string()))?;
    let [statement] = statements.as_slice() else {
        return Err(at("a rule is exactly one SELECT statement", None));
    };
    let ast::Statement::Query(query) = statement else {
        return Err(at("a rule is a SELECT statement", Some(statement.span())));
    };
    if let Some(with) = &query.with {
        return Err(at("WITH is not supported in rules", Some(with.span())));
    }
    if let Some(order) = &query.order_by {
        return Err(at(
            "ORDER BY is not supported in rules: a rule emits rows as they happen",
            Some(order.span()),
        ));
    }
    if query.limit_clause.is_some() || query.fetch.is_some() {
        return Err(at("LIMIT is not supported in rules", Some(query.span())));
    }
    let ast::SetExpr::Select(select) = query.body.as_ref() else {
        return Err(at(
            "a rule is a single SELECT (no UNION, VALUES or subquery)",
            Some(query.body.span()),
        ));
    };
    Compiler.select(select)
}

struct Compiler;

/// What an expression may refer to where it appears.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Place {
    /// WHERE, or the output of an unwindowed rule: one message.
    Message,
    /// The output of a HYSTERESIS or SEQUENCE rule: the message that completed the pattern,
    /// and the pattern's span.
    Pattern,
    /// The output or HAVING of a windowed rule: group keys, aggregates and window bounds.
    Window,
    /// The argument of an aggregate: one message, no nested aggregates.
    AggregateArgument,
}

struct WindowContext<'k> {
    keys: &'k [Column],
    aggregates: Vec<Aggregate>,
}

impl Compiler {
    fn error(
        &self,
        message: impl Into<String>,
        span: ast::helpers::attached_token::AttachedToken,
    ) -> SqlError {
        at(message, Some(span.0.span))
    }

    fn fail(&self, message: impl Into<String>, node: &impl Spanned) -> SqlError {
        at(message, Some(node.span()))
    }

    fn select(&self, select: &ast::Select) -> Result<Plan, SqlError> {
        if select.distinct.is_some() {
            return Err(self.error(
                "DISTINCT is not supported in rules",
                select.select_token.clone(),
            ));
        }
        let unsupported = select.top.is_some()
            || select.into.is_some()
            || !select.lateral_views.is_empty()
            || select.prewhere.is_some()
            || !select.connect_by.is_empty()
            || !select.cluster_by.is_empty()
            || !select.distribute_by.is_empty()
            || !select.sort_by.is_empty()
            || !select.named_window.is_empty()
            || select.qualify.is_some();
        if unsupported {
            return Err(self.error(
                "this SELECT clause is not supported in rules",
                select.select_token.clone(),
            ));
        }
        let stream = self.from(select)?;
        let filter = select
            .selection
            .as_ref()
            .map(|e| self.expr(e, Place::Message, None))
            .transpose()?;
        let grouped = self.group_by(select)?;
        let Some((trigger, keys)) = grouped else {
            if let Some(having) = &select.having {
                return Err(self.fail(
                    "HAVING needs a window: GROUP BY ..., TUMBLE(ts, INTERVAL '1' MINUTE)",
                    having,
                ));
            }
            let (columns, select_all) = self.projection(select, Place::Message, None)?;
            return Ok(Plan {
                stream,
                filter,
                columns,
                select_all,
                windowed: None,
            });
        };
        if let Trigger::Hysteresis { .. } | Trigger::Sequence { .. } = trigger {
            if let Some(having) = &select.having {
                return Err(self.fail(
                    "HAVING applies to windows; put the condition in the pattern",
                    having,
                ));
            }
            let (columns, select_all) = self.projection(select, Place::Pattern, None)?;
            return Ok(Plan {
                stream,
                filter,
                columns,
                select_all,
                windowed: Some(Windowed {
                    trigger,
                    keys,
                    aggregates: Vec::new(),
                    having: None,
                }),
            });
        }
        let mut context = WindowContext {
            keys: &keys,
            aggregates: Vec::new(),
        };
        let (columns, select_all) = self.projection(select, Place::Window, Some(&mut context))?;
        if let Trigger::Absence { .. } = trigger {
            let message = "ABSENCE rows are about messages that did not come: they have keys, window_start (the last arrival) and window_end, but no aggregates or HAVING";
            if !context.aggregates.is_empty() || select_all {
                return Err(self.error(message, select.select_token.clone()));
            }
            if let Some(having) = &select.having {
                return Err(self.fail(message, having));
            }
        }
        if select_all {
            return Err(self.error(
                "SELECT * cannot be used with a window: name the keys and aggregates",
                select.select_token.clone(),
            ));
        }
        let having = select
            .having
            .as_ref()
            .map(|e| self.expr(e, Place::Window, Some(&mut context)))
            .transpose()?;
        let aggregates = context.aggregates;
        Ok(Plan {
            stream,
            filter,
            columns,
            select_all: false,
            windowed: Some(Windowed {
                trigger,
                keys,
                aggregates,
                having,
            }),
        })
    }

    fn from(&self, select: &ast::Select) -> Result<&'static str, SqlError> {
        let [table] = select.from.as_slice() else {
            return Err(self.error(
                format!(
                    "a rule reads exactly one stream: FROM {}",
                    STREAMS.join(" | ")
                ),
                select.select_token.clone(),
            ));
        };
        if let Some(join) = table.joins.first() {
            return Err(self.fail(
                "JOIN is not supported; device labels are available as labels.NAME",
                join,
            ));
        }
        let ast::TableFactor::Table {
            name,
            alias: None,
            args: None,
            ..
        } = &table.relation
        else {
            return Err(self.fail(
                format!("FROM must name a stream: {}", STREAMS.join(", ")),
                &table.relation,
            ));
        };
        let stream = name.to_string().to_ascii_lowercase();
        STREAMS.into_iter().find(|s| *s == stream).ok_or_else(|| {
            self.fail(
                format!(
                    "unknown stream {stream:?}; rules read {}",
                    STREAMS.join(", ")
                ),
                name,
            )
        })
    }

    /// The window or pattern and the group keys, when the rule has GROUP BY.
    fn group_by(&self, select: &ast::Select) -> Result<Option<(Trigger, Vec<Column>)>, SqlError> {
        let exprs = match &select.group_by {
            ast::GroupByExpr::Expressions(exprs, modifiers) if modifiers.is_empty() => exprs,
            ast::GroupByExpr::Expressions(..) | ast::GroupByExpr::All(_) => {
                return Err(self.error(
                    "GROUP BY ALL and GROUP BY modifiers are not supported",
                    select.select_token.clone(),
                ));
            }
        };
        if exprs.is_empty() {
            return Ok(None);
        }
        let mut window = None;
        let mut keys = Vec::new();
        for e in exprs {
            if let ast::Expr::Function(f) = e {
                let name = f.name.to_string().to_ascii_uppercase();
                let trigger = match name.as_str() {
                    "TUMBLE" => {
                        let [size] = self.window_args(f, 1)?[..] else { unreachable!() };
                        Trigger::Window(WindowSpec { size_ms: size, slide_ms: size })
                    }
                    "HOP" => {
                        let [slide, size] = self.window_args(f, 2)?[..] else { unreachable!() };
                        if size % slide != 0 {
                            return Err(self.fail("HOP's size must be a whole multiple of its slide", f));
                        }
                        Trigger::Window(WindowSpec { size_ms: size, slide_ms: slide })
                    }
                    "SESSION" => {
                        let [gap] = self.window_args(f, 1)?[..] else { unreachable!() };
                        Trigger::Session { gap_ms: gap }
                    }
                    "ABSENCE" => match self.arguments(f, "ABSENCE(INTERVAL '5' MINUTE)")?[..] {
                        [timeout] => Trigger::Absence { timeout_ms: self.interval(timeout)? },
                        _ => return Err(self.fail("ABSENCE takes one interval: ABSENCE(INTERVAL '5' MINUTE)", f)),
                    },
                    "HYSTERESIS" => match self.arguments(f, "HYSTERESIS(temp > 80, temp < 70)")?[..] {
                        [enter, leave] => Trigger::Hysteresis {
                            enter: self.expr(enter, Place::Message, None)?,
                            leave: self.expr(leave, Place::Message, None)?,
                        },
                        _ => return Err(self.fail("HYSTERESIS takes two conditions: HYSTERESIS(temp > 80, temp < 70)", f)),
                    },
                    "SEQUENCE" => match self.arguments(f, "SEQUENCE(door = 1, motion = 1, INTERVAL '10' SECOND)")?[..] {
                        [first, then, within] => Trigger::Sequence {
                            first: self.expr(first, Place::Message, None)?,
                            then: self.expr(then, Place::Message, None)?,
                            within_ms: self.interval(within)?,
                        },
                        _ => return Err(self.fail("SEQUENCE takes two conditions and an interval: SEQUENCE(door = 1, motion = 1, INTERVAL '10' SECOND)", f)),
                    },
                    _ => return Err(self.fail(format!("GROUP BY takes device, labels.NAME and one window or pattern (TUMBLE, HOP, SESSION, ABSENCE, HYSTERESIS, SEQUENCE), not {name}()"), f)),
                };
                if window.replace(trigger).is_some() {
                    return Err(self.fail("a rule has one window or pattern", f));
                }
                continue;
            }
            match self.expr(e, Place::Message, None)? {
                Expr::Column(column @ (Column::Device | Column::Label(_))) => {
                    if !keys.contains(&column) {
                        keys.push(column);
                    }
                }
                _ => return Err(self.fail("GROUP BY keys are device and labels.NAME", e)),
            }
        }
        let window = window.ok_or_else(|| {
            self.error("GROUP BY needs a window or pattern: add TUMBLE(ts, INTERVAL '1' MINUTE), HOP(ts, slide, size), SESSION(ts, gap), ABSENCE(...), HYSTERESIS(...) or SEQUENCE(...)", select.select_token.clone())
        })?;
        Ok(Some((window, keys)))
    }

    /// A function's plain arguments.
    fn arguments<'f>(
        &self,
        f: &'f ast::Function,
        usage: &str,
    ) -> Result<Vec<&'f ast::Expr>, SqlError> {
        let ast::FunctionArguments::List(list) = &f.args else {
            return Err(self.fail(format!("expected {usage}"), f));
        };
        list.args
            .iter()
            .map(|a| match a {
                ast::FunctionArg::Unnamed(ast::FunctionArgExpr::Expr(e)) => Ok(e),
                other => Err(self.fail(format!("expected {usage}"), other)),
            })
            .collect()
    }

    /// `ts` followed by `n` intervals, in milliseconds.
    fn window_args(&self, f: &ast::Function, n: usize) -> Result<Vec<i64>, SqlError> {
        let usage = "windows are TUMBLE(ts, INTERVAL '1' MINUTE), HOP(ts, INTERVAL '1' MINUTE, INTERVAL '5' MINUTE) and SESSION(ts, INTERVAL '30' SECOND)";
        let args = self.arguments(f, usage)?;
        if args.len() != n + 1
            || !matches!(args[0], ast::Expr::Identifier(id) if id.value.eq_ignore_ascii_case("ts"))
        {
            return Err(self.fail(usage, f));
        }
        args[1..].iter().map(|e| self.interval(e)).collect()
    }

    fn interval(&self, e: &ast::Expr) -> Result<i64, SqlError> {
        let usage = "expected an interval such as INTERVAL '30' SECOND or INTERVAL '5 minutes'";
        let ast::Expr::Interval(interval) = e else {
            return Err(self.fail(usage, e));
        };
        let text = match interval.value.as_ref() {
            ast::Expr::Value(v) => match &v.value {
                ast::Value::SingleQuotedString(s) => s.clone(),
                ast::Value::Number(n, _) => n.to_string(),
                _ => return Err(self.fail(usage, e)),
            },
            _ => return Err(self.fail(usage, e)),
        };
        let mut words = text.split_whitespace();
        let amount: i64 = words
            .next()
            .and_then(|n| n.parse().ok())
            .filter(|n| *n > 0)
            .ok_or_else(|| self.fail(usage, e))?;
        let unit = match (&interval.leading_field, words.next()) {
            (Some(field), None) => field.to_string(),
            (None, Some(word)) => word.to_string(),
            _ => return Err(self.fail(usage, e)),
        };
        let unit_ms = match unit.to_ascii_lowercase().trim_end_matches('s') {
            "second" => 1_000,
            "minute" => 60_000,
            "hour" => 3_600_000,
            "day" => 86_400_000,
            _ => return Err(self.fail("interval units are SECOND, MINUTE, HOUR and DAY", e)),
        };
        let ms = amount
            .checked_mul(unit_ms)
            .filter(|ms| *ms <= 7 * 86_400_000);
        ms.ok_or_else(|| self.fail("a window is at most 7 days", e))
    }

    fn projection(
        &self,
        select: &ast::Select,
        place: Place,
        mut context: Option<&mut WindowContext>,
    ) -> Result<(Vec<(String, Expr)>, bool), SqlError> {
        let mut columns: Vec<(String, Expr)> = Vec::new();
        let mut select_all = false;
        for item in &select.projection {
            let (name, e) = match item {
                ast::SelectItem::Wildcard(_) => {
                    select_all = true;
                    continue;
                }
                ast::SelectItem::UnnamedExpr(e) => (output_name(e), e),
                ast::SelectItem::ExprWithAlias { expr, alias } => (alias.value.clone(), expr),
                other => return Err(self.fail("unsupported select item", other)),
            };
            if columns.iter().any(|(n, _)| *n == name) {
                return Err(self.fail(format!("two output columns are named {name:?}; use AS"), e));
            }
            let compiled = self.expr(e, place, context.as_deref_mut())?;
            columns.push((name, compiled));
        }
        Ok((columns, select_all))
    }

    fn expr(
        &self,
        e: &ast::Expr,
        place: Place,
        mut context: Option<&mut WindowContext>,
    ) -> Result<Expr, SqlError> {
        use ast::Expr as A;
        let compiled = match e {
            A::Nested(inner) => return self.expr(inner, place, context),
            A::Value(v) => Expr::Literal(self.literal(&v.value, e)?),
            A::Identifier(id) => self.column(
                vec![id.value.clone()],
                id.quote_style.is_some(),
                e,
                place,
                context.as_deref(),
            )?,
            A::CompoundIdentifier(parts) => self.column(
                parts.iter().map(|p| p.value.clone()).collect(),
                false,
                e,
                place,
                context.as_deref(),
            )?,
            A::UnaryOp { op, expr } => {
                let inner = Box::new(self.expr(expr, place, context)?);
                match op {
                    ast::UnaryOperator::Not => Expr::Not(inner),
                    ast::UnaryOperator::Minus => Expr::Negate(inner),
                    ast::UnaryOperator::Plus => *inner,
                    _ => return Err(self.fail(format!("operator {op} is not supported"), e)),
                }
            }
            A::BinaryOp { left, op, right } => {
                let op = match op {
                    ast::BinaryOperator::Plus => BinaryOp::Add,
                    ast::BinaryOperator::Minus => BinaryOp::Sub,
                    ast::BinaryOperator::Multiply => BinaryOp::Mul,
                    ast::BinaryOperator::Divide => BinaryOp::Div,
                    ast::BinaryOperator::Modulo => BinaryOp::Mod,
                    ast::BinaryOperator::Eq => BinaryOp::Eq,
                    ast::BinaryOperator::NotEq => BinaryOp::NotEq,
                    ast::BinaryOperator::Lt => BinaryOp::Lt,
                    ast::BinaryOperator::LtEq => BinaryOp::LtEq,
                    ast::BinaryOperator::Gt => BinaryOp::Gt,
                    ast::BinaryOperator::GtEq => BinaryOp::GtEq,
                    ast::BinaryOperator::And => BinaryOp::And,
                    ast::BinaryOperator::Or => BinaryOp::Or,
                    other => {
                        return Err(
                            self.fail(format!("operator {other} is not supported in rules"), e)
                        );
                    }
                };
                let left = Box::new(self.expr(left, place, context.as_deref_mut())?);
                let right = Box::new(self.expr(right, place, context)?);
                Expr::Binary(left, op, right)
            }
            A::IsNull(inner) => Expr::IsNull(Box::new(self.expr(inner, place, context)?), false),
            A::IsNotNull(inner) => Expr::IsNull(Box::new(self.expr(inner, place, context)?), true),
            A::In {
                expr,
                target: ast::InTarget::List(list),
                negated,
                global: false,
            } => {
                let target = Box::new(self.expr(expr, place, context.as_deref_mut())?);
                let items = list
                    .iter()
                    .map(|i| self.expr(i, place, context.as_deref_mut()))
                    .collect::<Result<_, _>>()?;
                Expr::InList(target, items, *negated)
            }
            A::Between {
                expr,
                negated,
                low,
                high,
            } => {
                let target = self.expr(expr, place, context.as_deref_mut())?;
                let low = self.expr(low, place, context.as_deref_mut())?;
                let high = self.expr(high, place, context)?;
                let within = Expr::Binary(
                    Box::new(Expr::Binary(
                        Box::new(target.clone()),
                        BinaryOp::GtEq,
                        Box::new(low),
                    )),
                    BinaryOp::And,
                    Box::new(Expr::Binary(
                        Box::new(target),
                        BinaryOp::LtEq,
                        Box::new(high),
                    )),
                );
                if *negated {
                    Expr::Not(Box::new(within))
                } else {
                    within
                }
            }
            A::Function(f) => self.aggregate(f, place, context)?,
            _ => return Err(self.fail("this expression is not supported in rules", e)),
        };
        Ok(compiled)
    }

    fn literal(&self, v: &ast::Value, e: &ast::Expr) -> Result<Value, SqlError> {
        Ok(match v {
            ast::Value::Number(n, _) => {
                Value::Number(n.parse().map_err(|_| self.fail("not a number", e))?)
            }
            ast::Value::SingleQuotedString(s) => Value::Text(s.clone()),
            ast::Value::Boolean(b) => Value::Bool(*b),
            ast::Value::Null => Value::Null,
            _ => return Err(self.fail("literals are numbers, 'text', TRUE, FALSE and NULL", e)),
        })
    }

    fn column(
        &self,
        parts: Vec<String>,
        quoted: bool,
        e: &ast::Expr,
        place: Place,
        context: Option<&WindowContext>,
    ) -> Result<Expr, SqlError> {
        let column = match parts.as_slice() {
            [name] if !quoted && name.eq_ignore_ascii_case("device") => Column::Device,
            [name] if !quoted && name.eq_ignore_ascii_case("ts") => Column::Ts,
            [name] if !quoted && name.eq_ignore_ascii_case("window_start") => {
                return match place {
                    Place::Window | Place::Pattern => Ok(Expr::WindowStart),
                    _ => Err(self.fail(
                        "window_start exists only in the output of a windowed rule",
                        e,
                    )),
                };
            }
            [name] if !quoted && name.eq_ignore_ascii_case("window_end") => {
                return match place {
                    Place::Window | Place::Pattern => Ok(Expr::WindowEnd),
                    _ => {
                        Err(self.fail("window_end exists only in the output of a windowed rule", e))
                    }
                };
            }
            [name] => Column::Metric(name.clone()),
            [prefix, label] if prefix.eq_ignore_ascii_case("labels") => {
                Column::Label(label.clone())
            }
            [prefix, side, path @ ..]
                if prefix.eq_ignore_ascii_case("twin") && !path.is_empty() =>
            {
                let reported = match side.to_ascii_lowercase().as_str() {
                    "reported" => true,
                    "desired" => false,
                    _ => {
                        return Err(self.fail(
                            "twin fields are twin.reported.PATH and twin.desired.PATH",
                            e,
                        ));
                    }
                };
                Column::Twin {
                    reported,
                    path: path.to_vec(),
                }
            }
            _ => {
                return Err(self.fail(
                    "columns are metric names, device, ts, labels.NAME, twin.reported.PATH and twin.desired.PATH",
                    e,
                ));
            }
        };
        if place != Place::Window {
            return Ok(Expr::Column(column));
        }
        let keys = context.map_or(&[][..], |c| c.keys);
        match keys.iter().position(|k| *k == column) {
            Some(i) => Ok(Expr::GroupKey(i)),
            None => Err(self.fail(
                format!(
                    "{} must be a GROUP BY key or inside an aggregate such as avg(...)",
                    output_name(e)
                ),
                e,
            )),
        }
    }

    fn aggregate(
        &self,
        f: &ast::Function,
        place: Place,
        context: Option<&mut WindowContext>,
    ) -> Result<Expr, SqlError> {
        let name = f.name.to_string().to_ascii_lowercase();
        let function = match name.as_str() {
            "count" => AggregateFn::Count,
            "sum" => AggregateFn::Sum,
            "avg" => AggregateFn::Avg,
            "min" => AggregateFn::Min,
            "max" => AggregateFn::Max,
            "median" => AggregateFn::Percentile(500_000),
            "percentile" => AggregateFn::Percentile(self.percentile_of(f)?),
            "tumble" | "hop" | "session" => {
                return Err(self.fail(format!("{name}() belongs in GROUP BY"), f));
            }
            _ => {
                return Err(self.fail(
                    format!("unknown function {name}(); rules have count, sum, avg, min, max, median and percentile"),
                    f,
                ));
            }
        };
        let (Place::Window, Some(context)) = (place, context) else {
            let message = match place {
                Place::AggregateArgument => "aggregates cannot be nested".to_string(),
                _ => format!(
                    "{name}() needs a window: GROUP BY device, TUMBLE(ts, INTERVAL '1' MINUTE)"
                ),
            };
            return Err(self.fail(message, f));
        };
        let ast::FunctionArguments::List(list) = &f.args else {
            return Err(self.fail(format!("{name}() takes one argument"), f));
        };
        if list.duplicate_treatment.is_some()
            || !list.clauses.is_empty()
            || f.filter.is_some()
            || f.over.is_some()
        {
            return Err(self.fail(
                "DISTINCT, FILTER and OVER are not supported in aggregates",
                f,
            ));
        }
        let argument = match list.args.as_slice() {
            [ast::FunctionArg::Unnamed(ast::FunctionArgExpr::Wildcard)]
                if function == AggregateFn::Count =>
            {
                None
            }
            [ast::FunctionArg::Unnamed(ast::FunctionArgExpr::Expr(e))]
                if !matches!(function, AggregateFn::Percentile(_)) || name == "median" =>
            {
                Some(self.expr(e, Place::AggregateArgument, None)?)
            }
            [ast::FunctionArg::Unnamed(ast::FunctionArgExpr::Expr(e)), _]
                if name == "percentile" =>
            {
                Some(self.expr(e, Place::AggregateArgument, None)?)
            }
            _ if name == "percentile" => {
                return Err(self.fail(
                    "percentile takes a value and a fraction: percentile(temp, 0.99)",
                    f,
                ));
            }
            _ => return Err(self.fail(format!("{name}() takes one argument"), f)),
        };
        let aggregate = Aggregate { function, argument };
        let index = match context.aggregates.iter().position(|a| *a == aggregate) {
            Some(i) => i,
            None => {
                context.aggregates.push(aggregate);
                context.aggregates.len() - 1
            }
        };
        Ok(Expr::Aggregate(index))
    }
}

impl Compiler {
    /// The fraction of `percentile(x, 0.99)`, in parts per million.
    fn percentile_of(&self, f: &ast::Function) -> Result<u32, SqlError> {
        let usage = "percentile takes a value and a fraction from 0 to 1: percentile(temp, 0.99)";
        let args = self.arguments(f, usage)?;
        let [_, fraction] = args[..] else {
            return Err(self.fail(usage, f));
        };
        match fraction {
            ast::Expr::Value(v) => match &v.value {
                ast::Value::Number(n, _) => n
                    .parse::<f64>()
                    .ok()
                    .filter(|p| (0.0..=1.0).contains(p))
                    .map(|p| (p * 1_000_000.0).round() as u32)
                    .ok_or_else(|| self.fail(usage, fraction)),
                _ => Err(self.fail(usage, fraction)),
            },
            _ => Err(self.fail(usage, fraction)),
        }
    }
}

/// The output name of an unaliased expression: a column's own name (a label's name for
/// `labels.NAME`), else its SQL text.
fn output_name(e: &ast::Expr) -> String {
    match e {
        ast::Expr::Identifier(id) => id.value.clone(),
        ast::Expr::CompoundIdentifier(parts) => {
            parts.last().map(|p| p.value.clone()).unwrap_or_default()
        }
        other => other.to_string(),
    }
}

fn at(message: impl Into<String>, span: Option<sqlparser::tokenizer::Span>) -> SqlError {
    let (line, column) = match span.filter(|s| s.start.line > 0) {
        Some(span) => (span.start.line, span.start.column),
        None => (1, 1),
    };
    SqlError {
        message: message.into(),
        line,
        column,
    }
}

/// sqlparser reports `... at Line: L, Column: C`; errors at the end of input carry no
/// position, so they point just past the last character.
fn parse_error(sql: &str, text: &str) -> SqlError {
    let text = text.trim_start_matches("sql parser error: ");
    if let Some((message, position)) = text.rsplit_once(" at Line: ")
        && let Some((line, column)) = position.split_once(", Column: ")
        && let (Ok(line), Ok(column)) = (line.trim().parse(), column.trim().parse())
    {
        return SqlError {
            message: message.to_string(),
            line,
            column,
        };
    }
    let line = sql.lines().count().max(1) as u64;
    let column = sql.lines().last().map_or(0, |l| l.chars().count()) as u64 + 1;
    SqlError {
        message: text.to_string(),
        line,
        column,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(sql: &str) -> SqlError {
        compile(sql).expect_err("refused")
    }

    #[test]
    fn filters_and_groups_by_device_are_per_device() {
        let per_device = |sql: &str| compile(sql).expect("compiles").per_device();
        assert!(per_device(
            "SELECT device, temp FROM telemetry WHERE temp > 50"
        ));
        assert!(per_device(
            "SELECT device, labels.site, avg(temp) FROM telemetry \
             GROUP BY labels.site, device, TUMBLE(ts, INTERVAL '1' MINUTE)"
        ));
        assert!(per_device(
            "SELECT device FROM telemetry GROUP BY device, ABSENCE(INTERVAL '5' MINUTE)"
        ));
        assert!(!per_device(
            "SELECT labels.site, avg(temp) FROM telemetry \
             GROUP BY labels.site, TUMBLE(ts, INTERVAL '1' MINUTE)"
        ));
    }

    #[test]
    fn errors_name_the_problem_and_point_at_the_token() {
        let e = error("SELECT device FROM telemetry WHERE temp >> 5");
        assert_eq!((e.line, e.column), (1, 36), "{e}");
        assert!(e.message.contains("operator"), "{e}");

        let e = error("SELECT device\nFROM weather");
        assert_eq!((e.line, e.column), (2, 6), "{e}");
        assert!(e.message.contains("unknown stream \"weather\""), "{e}");

        let e = error(
            "SELECT device, temp FROM telemetry GROUP BY device, TUMBLE(ts, INTERVAL '1' MINUTE)",
        );
        assert_eq!((e.line, e.column), (1, 16), "{e}");
        assert!(
            e.message.contains("GROUP BY key or inside an aggregate"),
            "{e}"
        );

        let e = error("SELECT avg(temp) FROM telemetry");
        assert_eq!((e.line, e.column), (1, 8), "{e}");
        assert!(e.message.contains("needs a window"), "{e}");

        let e = error("SELECT device FROM telemetry WHERE");
        assert_eq!((e.line, e.column), (1, 35), "end of input: {e}");

        let e = error("SELECT device FROM telemetry WHERE stddev(temp) > 1");
        assert!(e.message.contains("unknown function stddev()"), "{e}");
        assert_eq!(e.column, 36);

        let e = error("SELECT device FROM telemetry GROUP BY device");
        assert!(e.message.contains("needs a window"), "{e}");
        let e = error(
            "SELECT device, count(*) FROM telemetry GROUP BY device, TUMBLE(ts, INTERVAL '1 fortnight')",
        );
        assert!(e.message.contains("interval"), "{e}");
        let e = error(
            "SELECT device, count(*) FROM telemetry GROUP BY device, HOP(ts, INTERVAL '2' MINUTE, INTERVAL '5' MINUTE)",
        );
        assert!(e.message.contains("multiple of its slide"), "{e}");
        let e = error("SELECT device FROM telemetry ORDER BY ts");
        assert!(e.message.contains("ORDER BY"), "{e}");
        let e = error("SELECT device FROM telemetry t JOIN devices d ON t.device = d.id");
        assert!(e.message.contains("JOIN"), "{e}");
        let e = error(
            "SELECT device, count(*) FROM telemetry GROUP BY device, ABSENCE(INTERVAL '5' MINUTE)",
        );
        assert!(e.message.contains("ABSENCE rows"), "{e}");
        let e = error(
            "SELECT device FROM telemetry GROUP BY device, HYSTERESIS(temp > 80, temp < 70) HAVING temp > 1",
        );
        assert!(e.message.contains("HAVING applies to windows"), "{e}");
        let e = error(
            "SELECT device FROM telemetry GROUP BY device, SEQUENCE(door = 1, INTERVAL '1' MINUTE)",
        );
        assert!(
            e.message
                .contains("SEQUENCE takes two conditions and an interval"),
            "{e}"
        );
        let e = error(
            "SELECT device FROM telemetry GROUP BY device, TUMBLE(ts, INTERVAL '1' MINUTE), ABSENCE(INTERVAL '1' MINUTE)",
        );
        assert!(e.message.contains("one window or pattern"), "{e}");
        let e = error(
            "SELECT device, percentile(temp, 1.5) FROM telemetry GROUP BY device, TUMBLE(ts, INTERVAL '1' MINUTE)",
        );
        assert!(e.message.contains("fraction from 0 to 1"), "{e}");
        assert_eq!(e.column, 33, "points at the fraction");
        let e = error(
            "SELECT device, percentile(temp) FROM telemetry GROUP BY device, TUMBLE(ts, INTERVAL '1' MINUTE)",
        );
        assert!(e.message.contains("percentile(temp, 0.99)"), "{e}");
        let e = error("SELECT device FROM telemetry WHERE twin.wanted.x = 1");
        assert!(e.message.contains("twin.reported.PATH"), "{e}");
        let plan =
            compile("SELECT device FROM telemetry WHERE twin.desired.a.b = 1").expect("plan");
        assert!(plan.uses_twin() && !plan.uses_labels());
        let plan = compile(
            "SELECT device FROM telemetry GROUP BY device, HYSTERESIS(labels.x = 'a', temp < 1)",
        )
        .expect("plan");
        assert!(plan.uses_labels(), "labels inside a pattern count too");
        let e = error("DELETE FROM telemetry");
        assert!(e.message.contains("SELECT"), "{e}");
        let e =
            error("SELECT max(avg(temp)) FROM telemetry GROUP BY TUMBLE(ts, INTERVAL '1' MINUTE)");
        assert!(e.message.contains("nested"), "{e}");
    }

    #[test]
    fn plans_filters_and_windows() {
        let plan = compile("SELECT device, temp * 2 AS doubled FROM telemetry WHERE temp > 50 AND labels.site = 'berlin'").expect("plan");
        assert!(plan.windowed.is_none() && plan.per_device() && plan.uses_labels());
        assert_eq!(
            plan.columns
                .iter()
                .map(|c| c.0.as_str())
                .collect::<Vec<_>>(),
            ["device", "doubled"]
        );

        let plan = compile(
            "SELECT labels.site, avg(temp), count(*) AS n FROM telemetry \
             GROUP BY labels.site, HOP(ts, INTERVAL '1' MINUTE, INTERVAL '5 minutes') HAVING avg(temp) > 3",
        )
        .expect("plan");
        let windowed = plan.windowed.as_ref().expect("windowed");
        assert_eq!(
            windowed.trigger,
            Trigger::Window(WindowSpec {
                size_ms: 300_000,
                slide_ms: 60_000
            })
        );
        assert_eq!(windowed.keys, vec![Column::Label("site".into())]);
        assert_eq!(
            windowed.aggregates.len(),
            2,
            "avg(temp) in HAVING reuses the projection's"
        );
        assert!(!plan.per_device());
        assert_eq!(plan.columns[0].0, "site");
        assert_eq!(plan.columns[1].0, "avg(temp)");
    }
}
