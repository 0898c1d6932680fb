//! eKuiper's SQL dialect for `sqlparser`: strings in double (or single) quotes, identifiers
//! plain or in backticks, and `cast(value, "type")` as an ordinary function call (eKuiper's
//! form) rather than SQL's `CAST(value AS type)`.

use sqlparser::ast::{Expr, Ident, ObjectName};
use sqlparser::dialect::Dialect;
use sqlparser::keywords::Keyword;
use sqlparser::parser::{Parser, ParserError};
use sqlparser::tokenizer::Token;

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
            _ => None,
        }
    }
}
