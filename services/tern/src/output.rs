//! Printing command results: JSON for scripts, short text for people.

use serde_json::Value;

use crate::cli::Output;

/// Prints one record: pretty JSON, or aligned `key: value` lines of the chosen fields.
pub fn record(format: Output, value: &Value, fields: &[&str]) {
    match format {
        Output::Json => print_json(value),
        Output::Human => {
            let width = fields.iter().map(|f| f.len()).max().unwrap_or(0);
            for field in fields {
                println!("{field:<width$}  {}", text(&value[*field]));
            }
        }
    }
}

/// Prints a list: pretty JSON, or a table of the chosen columns.
pub fn table(format: Output, rows: &Value, columns: &[&str]) {
    if format == Output::Json {
        print_json(rows);
        return;
    }
    let rows: Vec<&Value> = rows
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|row| columns.iter().map(|c| text(&row[*c])).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].len())
                .chain([c.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |values: Vec<String>| {
        let parts: Vec<String> = values
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(columns.iter().map(|c| c.to_uppercase()).collect());
    for row in cells {
        line(row);
    }
}

fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
    );
}

/// A JSON value as text: strings unquoted, objects as `k=v,k=v`, null as `-`.
pub fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Object(map) if map.is_empty() => "-".into(),
        Value::Object(map) => {
            // Sorted: the map keeps insertion order (serde_json's preserve_order, which Cedar
            // turns on), and people expect the same order every time.
            let mut pairs: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{k}={}", text(v)))
                .collect();
            pairs.sort();
            pairs.join(",")
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_render_as_plain_text() {
        assert_eq!(text(&serde_json::json!("a")), "a");
        assert_eq!(text(&serde_json::json!(null)), "-");
        assert_eq!(
            text(&serde_json::json!({"site": "berlin", "floor": 2})),
            "floor=2,site=berlin"
        );
        assert_eq!(text(&serde_json::json!(true)), "true");
    }
}
