//! Word frequencies over stdin, an ordinary program with no wasnap code or import: it
//! reads lines with `std::io::stdin().lines()`, counts words in a `HashMap`, and prints a
//! line per input line. wasnap runs it unmodified in stdio mode (`wasnap run --stdio`).
//!
//! For each input line it prints `<line number> <distinct words> <word>=<count> ...` for
//! the line's words; every 1000th line also the most frequent word so far. At the end it
//! prints a summary.

use std::collections::HashMap;
use std::io::{BufWriter, Write};

fn main() {
    let mut counts: HashMap<String, u64> = HashMap::new();
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let mut lines = 0u64;
    for line in std::io::stdin().lines() {
        let line = line.expect("stdin is readable");
        lines += 1;
        let mut text = String::new();
        for word in line.split_whitespace() {
            let count = counts.entry(word.to_lowercase()).or_insert(0);
            *count += 1;
            text.push_str(&format!(" {word}={count}"));
        }
        writeln!(out, "{lines} {}{text}", counts.len()).expect("stdout is writable");
        if lines % 1000 == 0 {
            // Ties broken by the word, so the answer does not depend on hash order.
            let top = counts.iter().max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)));
            if let Some((word, count)) = top {
                writeln!(out, "# top after {lines} lines: {word} {count}").expect("stdout");
            }
        }
    }
    writeln!(out, "# {lines} lines, {} distinct words", counts.len()).expect("stdout");
}
