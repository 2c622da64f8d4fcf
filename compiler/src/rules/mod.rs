//! The label-based rule language (docs/rule-language.md): parser (nom) →
//! syntax tree → validation and lints → the same model as NetworkPolicy.
//! Files ending in `.trireme` are read by every command beside YAML.

pub mod ast;
pub mod format;
pub mod lower;
pub mod parse;

use crate::diag::{Diagnostic, Location};
use crate::model::Policy;
use std::sync::Arc;

/// Offsets → 1-based line and column (in characters).
pub struct LineIndex {
    starts: Vec<usize>,
    text: Arc<str>,
}

impl LineIndex {
    pub fn new(text: &str) -> LineIndex {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex {
            starts,
            text: Arc::from(text),
        }
    }

    pub fn line_col(&self, offset: usize) -> (u32, u32) {
        let offset = offset.min(self.text.len());
        let line = self.starts.partition_point(|&s| s <= offset).max(1) - 1;
        let start = self.starts[line];
        let col = self.text[start..offset].chars().count() + 1;
        (line as u32 + 1, col as u32)
    }

    /// The offending line with a caret under the column.
    pub fn snippet(&self, offset: usize) -> String {
        let (line, col) = self.line_col(offset);
        let start = self.starts[line as usize - 1];
        let end = self.text[start..]
            .find('\n')
            .map_or(self.text.len(), |e| start + e);
        let src = &self.text[start..end];
        let gutter = line.to_string().len();
        format!(
            "\n{:gutter$} |\n{line} | {src}\n{:gutter$} | {}^",
            "",
            "",
            " ".repeat(col as usize - 1)
        )
    }
}

pub struct Loaded {
    pub policies: Vec<Policy>,
    pub warnings: Vec<Diagnostic>,
}

fn diag(file: &Arc<str>, lines: &LineIndex, offset: usize, msg: &str) -> Diagnostic {
    let (line, col) = lines.line_col(offset);
    Diagnostic::at(
        Location {
            file: file.clone(),
            line,
            col,
        },
        format!("{msg}{}", lines.snippet(offset)),
    )
}

/// Parse, validate and lower one rule file. All syntax errors (one per
/// broken policy) or all validation errors are returned together.
/// `plugins`: the decide plugins `ask` may name, sorted.
pub fn load(
    file: &Arc<str>,
    text: &str,
    file_index: u32,
    plugins: &[String],
) -> Result<Loaded, Vec<Diagnostic>> {
    let lines = LineIndex::new(text);
    let ast = parse::parse(text).map_err(|errs| {
        errs.iter()
            .map(|e| diag(file, &lines, e.offset, &e.message))
            .collect::<Vec<_>>()
    })?;
    let low = lower::lower(&ast, &lines, file_index, plugins);
    if !low.errors.is_empty() {
        return Err(low
            .errors
            .iter()
            .map(|e| diag(file, &lines, e.offset, &e.message))
            .collect());
    }
    Ok(Loaded {
        policies: low.policies,
        warnings: low
            .warnings
            .iter()
            .map(|w| diag(file, &lines, w.offset, &w.message))
            .collect(),
    })
}

/// `trireme fmt`: the canonical text, or the syntax errors.
pub fn format_text(file: &Arc<str>, text: &str) -> Result<String, Vec<Diagnostic>> {
    let lines = LineIndex::new(text);
    let ast = parse::parse(text).map_err(|errs| {
        errs.iter()
            .map(|e| diag(file, &lines, e.offset, &e.message))
            .collect::<Vec<_>>()
    })?;
    Ok(format::format(&ast, text))
}
