//! eKuiper's SQL dialect for `sqlparser`: strings in double (or single) quotes, identifiers
//! plain or in backticks, `cast(value, "type")` as an ordinary function call (eKuiper's
//! form) rather than SQL's `CAST(value AS type)`, and eKuiper's `OVER` clause of analytic
//! functions.
//!
//! # `OVER ([PARTITION BY e, ...] [WHEN cond])`
//!
//! eKuiper's analytic functions take `OVER (PARTITION BY <exprs> WHEN <condition>)`
//! (`internal/xsql/parser.go`, `parseOver`: either part may be left out, not both). SQL has
//! no `WHEN` there, so a call of one of the analytic functions ([`crate::analytic::NAMES`])
//! is parsed by this dialect (the `parse_prefix` hook) instead of `sqlparser`'s generic
//! function call: the name, the arguments, then an optional `OVER (...)`. The result is an
//! ordinary [`Expr::Function`] whose `over` holds the `PARTITION BY` expressions and whose
//! `filter` (SQL's `FILTER (WHERE ...)`, which this dialect does not otherwise parse) holds
//! the `WHEN` condition. Every token keeps its position, so errors inside the clause point
//! at the right line and column. A window name, `ORDER BY` or a frame inside this `OVER`
//! is a syntax error, as in eKuiper; `OVER` after any other function is parsed by
//! `sqlparser` and refused by the planner.

use sqlparser::ast::{
    Expr, Function, FunctionArgumentList, FunctionArguments, Ident, ObjectName, WindowSpec,
    WindowType,
};
use sqlparser::dialect::Dialect;
use sqlparser::keywords::Keyword;
use sqlparser::parser::{Parser, ParserError};
use sqlparser::tokenizer::Token;

use crate::analytic;

/// The dialect (see the module docs).
#[derive(Debug, Default, Clone, Copy)]
pub struct EkuiperDialect;

impl Dialect for EkuiperDialect {
    fn is_identifier_start(&self, ch: char) -> bool {
        ch.is_alphabetic() || ch == '_'
    }

    fn is_identifier_part(&self, ch: char) -> bool {
        ch.is_alphanumeric() || ch == '_'
    }

    fn is_delimited_identifier_start(&self, ch: char) -> bool {
        ch == '`'
    }

    fn supports_string_literal_backslash_escape(&self) -> bool {
        true
    }

    fn parse_prefix(&self, parser: &mut Parser) -> Option<Result<Expr, ParserError>> {
        let [word, paren] = parser.peek_tokens::<2>();
        match (word, paren) {
            (Token::Word(w), Token::LParen) if w.keyword == Keyword::CAST => {
                parser.next_token();
                Some(parser.parse_function(ObjectName::from(vec![Ident::new("cast")])))
            }
            (Token::Word(w), Token::LParen)
                if w.quote_style.is_none() && analytic::is_analytic(&w.value) =>
            {
                Some(parse_analytic(parser))
            }
            _ => None,
        }
    }
}

/// `name(args) [OVER ([PARTITION BY e, ...] [WHEN cond])]`, the name and `(` next.
fn parse_analytic(parser: &mut Parser) -> Result<Expr, ParserError> {
    let name_token = parser.next_token();
    let Token::Word(w) = &name_token.token else {
        return parser.expected("a function name", name_token);
    };
    let name = Ident {
        value: w.value.clone(),
        quote_style: None,
        span: name_token.span,
    };
    parser.expect_token(&Token::LParen)?;
    let args = parser.parse_optional_args()?;
    let (over, when) = if parser.parse_keyword(Keyword::OVER) {
        parser.expect_token(&Token::LParen)?;
        let partition_by = if parser.parse_keywords(&[Keyword::PARTITION, Keyword::BY]) {
            parser.parse_comma_separated(Parser::parse_expr)?
        } else {
            Vec::new()
        };
        let when = if parser.parse_keyword(Keyword::WHEN) {
            Some(Box::new(parser.parse_expr()?))
        } else {
            None
        };
        if partition_by.is_empty() && when.is_none() {
            let found = parser.peek_token();
            return parser.expected("PARTITION BY or WHEN after OVER (", found);
        }
        let found = parser.peek_token();
        if !parser.consume_token(&Token::RParen) {
            return parser.expected(") to close OVER (", found);
        }
        let spec = WindowSpec {
            window_name: None,
            partition_by,
            order_by: Vec::new(),
            window_frame: None,
        };
        (Some(WindowType::WindowSpec(spec)), when)
    } else {
        (None, None)
    };
    Ok(Expr::Function(Function {
        name: ObjectName::from(vec![name]),
        uses_odbc_syntax: false,
        parameters: FunctionArguments::None,
        args: FunctionArguments::List(FunctionArgumentList {
            duplicate_treatment: None,
            args,
            clauses: Vec::new(),
        }),
        filter: when,
        null_treatment: None,
        over,
        within_group: Vec::new(),
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use sqlparser::ast::{SelectItem, SetExpr, Spanned, Statement};

    fn first_item(sql: &str) -> Expr {
        let mut st = Parser::parse_sql(&EkuiperDialect, sql).unwrap();
        let Some(Statement::Query(q)) = st.pop() else {
            panic!("not a query")
        };
        let SetExpr::Select(s) = *q.body else {
            panic!("not a select")
        };
        match s.projection.into_iter().next().unwrap() {
            SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => e,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn over_with_partition_and_when() {
        let e = first_item(
            "SELECT ts - lag(ts, 1, ts, true) OVER (PARTITION BY a, b WHEN had_changed(true, s)) AS d FROM x",
        );
        let Expr::BinaryOp { right, .. } = e else {
            panic!("{e:?}")
        };
        let Expr::Function(f) = *right else {
            panic!("{right:?}")
        };
        assert_eq!(f.name.to_string(), "lag");
        let Some(WindowType::WindowSpec(w)) = &f.over else {
            panic!("{:?}", f.over)
        };
        assert_eq!(w.partition_by.len(), 2);
        let when = f.filter.as_deref().unwrap();
        assert!(matches!(when, Expr::Function(g) if g.name.to_string() == "had_changed"));
        // Positions are the tokens' own: `had_changed` starts at column 63.
        assert_eq!(when.span().start.column, 63);
        let e = first_item("SELECT latest(x) OVER (WHEN x > 1) FROM t");
        let Expr::Function(f) = e else { panic!() };
        let Some(WindowType::WindowSpec(w)) = &f.over else {
            panic!()
        };
        assert!(w.partition_by.is_empty() && f.filter.is_some());
        // Without OVER, and as a plain column name, nothing changes.
        let e = first_item("SELECT lag(x) FROM t");
        assert!(matches!(e, Expr::Function(f) if f.over.is_none() && f.filter.is_none()));
        assert!(matches!(
            first_item("SELECT lag FROM t"),
            Expr::Identifier(_)
        ));
    }

    #[test]
    fn malformed_over_is_a_positioned_syntax_error() {
        for (sql, want) in [
            ("SELECT lag(x) OVER () FROM t", "Line: 1, Column: 21"),
            ("SELECT lag(x) OVER (WHEN) FROM t", "Line: 1, Column: 25"),
            (
                "SELECT lag(x)\n OVER (PARTITION BY a ORDER BY b) FROM t",
                "Line: 2, Column: 23",
            ),
            ("SELECT lag(x) OVER w FROM t", "Line: 1, Column: 20"),
            ("SELECT lag(x OVER (WHEN a) FROM t", "Line: 1, Column: 14"),
        ] {
            let e = Parser::parse_sql(&EkuiperDialect, sql)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{sql}: {e}");
        }
    }
}
