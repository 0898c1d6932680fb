//! Modbus addresses: the 0-based protocol offset and the conventional 1-based shorthand.
//!
//! On the wire a Modbus request names a table (by its function code) and a 0-based offset in
//! it (0..=65535). Manuals often write addresses in a 1-based shorthand whose first digit names
//! the table: `40001` is holding register offset 0, `30001` input register offset 0, `10001`
//! discrete input offset 0, `00001` (or just `1`) coil offset 0. The 5-digit form reaches
//! offset 9998 (`49999`); the 6-digit form (`400001`..=`465536`) covers the whole table.

use crate::model::Table;

/// Why a shorthand address string is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AddressError {
    /// The string is empty or holds something other than ASCII digits.
    #[error(
        "address {0:?} is not a shorthand address (digits only, such as \"40001\" or \"400001\"; use an integer for a 0-based offset)"
    )]
    NotDigits(String),
    /// The string has more than 6 digits.
    #[error("address {0:?} has more than 6 digits")]
    TooLong(String),
    /// The first digit of a 5- or 6-digit address names no table.
    #[error(
        "address {addr:?} starts with {digit}, which names no table (0 = coil, 1 = discrete input, 3 = input register, 4 = holding register)"
    )]
    UnknownTable {
        /// The address as written.
        addr: String,
        /// Its first digit.
        digit: char,
    },
    /// The register number after the table digit is 0 or too large for the form used.
    #[error("address {addr:?}: register number {number} is out of range (1..={max})")]
    OutOfRange {
        /// The address as written.
        addr: String,
        /// The 1-based number after the table digit.
        number: u32,
        /// The largest number the form allows (9999 for 5 digits, 65536 for 6).
        max: u32,
    },
}

/// Parses a 1-based shorthand address into its table and 0-based offset.
///
/// Forms: 1 to 4 digits are a coil number (`"1"` = coil offset 0); 5 digits are a table digit
/// and a number 1..=9999 (`"40001"`); 6 digits are a table digit and a number 1..=65536
/// (`"465536"` = holding register offset 65535). Table digits: 0 coil, 1 discrete input,
/// 3 input register, 4 holding register.
pub fn parse_shorthand(s: &str) -> Result<(Table, u16), AddressError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AddressError::NotDigits(s.to_owned()));
    }
    if s.len() > 6 {
        return Err(AddressError::TooLong(s.to_owned()));
    }
    let (table, digits, max) = if s.len() <= 4 {
        (Table::Coil, s, 9999)
    } else {
        let (head, rest) = s.split_at(1);
        let table = match head {
            "0" => Table::Coil,
            "1" => Table::DiscreteInput,
            "3" => Table::InputRegister,
            "4" => Table::HoldingRegister,
            _ => {
                return Err(AddressError::UnknownTable {
                    addr: s.to_owned(),
                    digit: head.chars().next().unwrap_or('?'),
                });
            }
        };
        (table, rest, if s.len() == 5 { 9999 } else { 65536 })
    };
    // At most 5 ASCII digits: always fits a u32.
    let number: u32 = digits
        .parse()
        .map_err(|_| AddressError::NotDigits(s.to_owned()))?;
    if number == 0 || number > max {
        return Err(AddressError::OutOfRange {
            addr: s.to_owned(),
            number,
            max,
        });
    }
    let offset = u16::try_from(number - 1).map_err(|_| AddressError::OutOfRange {
        addr: s.to_owned(),
        number,
        max,
    })?;
    Ok((table, offset))
}

/// The conventional shorthand for `offset` in `table`: the 5-digit form when it fits
/// (`40001`), else the 6-digit form (`465536`). Used to name registers in messages.
pub fn shorthand(table: Table, offset: u32) -> String {
    let digit = match table {
        Table::Coil => 0,
        Table::DiscreteInput => 1,
        Table::InputRegister => 3,
        Table::HoldingRegister => 4,
    };
    let number = offset + 1;
    if number <= 9999 {
        format!("{digit}{number:04}")
    } else {
        format!("{digit}{number:05}")
    }
}

/// How messages name a table: "holding register", "coil", ...
pub(crate) fn table_words(table: Table) -> &'static str {
    match table {
        Table::Coil => "coil",
        Table::DiscreteInput => "discrete input",
        Table::InputRegister => "input register",
        Table::HoldingRegister => "holding register",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_digit_forms() {
        assert_eq!(parse_shorthand("40001"), Ok((Table::HoldingRegister, 0)));
        assert_eq!(parse_shorthand("49999"), Ok((Table::HoldingRegister, 9998)));
        assert_eq!(parse_shorthand("30001"), Ok((Table::InputRegister, 0)));
        assert_eq!(parse_shorthand("30010"), Ok((Table::InputRegister, 9)));
        assert_eq!(parse_shorthand("10001"), Ok((Table::DiscreteInput, 0)));
        assert_eq!(parse_shorthand("10101"), Ok((Table::DiscreteInput, 100)));
        assert_eq!(parse_shorthand("00001"), Ok((Table::Coil, 0)));
        assert_eq!(parse_shorthand("09999"), Ok((Table::Coil, 9998)));
    }

    #[test]
    fn short_forms_are_coils() {
        assert_eq!(parse_shorthand("1"), Ok((Table::Coil, 0)));
        assert_eq!(parse_shorthand("17"), Ok((Table::Coil, 16)));
        assert_eq!(parse_shorthand("9999"), Ok((Table::Coil, 9998)));
        assert!(matches!(
            parse_shorthand("0"),
            Err(AddressError::OutOfRange { number: 0, .. })
        ));
    }

    #[test]
    fn six_digit_forms() {
        assert_eq!(parse_shorthand("400001"), Ok((Table::HoldingRegister, 0)));
        assert_eq!(
            parse_shorthand("465536"),
            Ok((Table::HoldingRegister, 65535))
        );
        assert_eq!(parse_shorthand("310000"), Ok((Table::InputRegister, 9999)));
        assert_eq!(parse_shorthand("100001"), Ok((Table::DiscreteInput, 0)));
        assert_eq!(parse_shorthand("000001"), Ok((Table::Coil, 0)));
        assert!(matches!(
            parse_shorthand("465537"),
            Err(AddressError::OutOfRange {
                number: 65537,
                max: 65536,
                ..
            })
        ));
        assert!(matches!(
            parse_shorthand("400000"),
            Err(AddressError::OutOfRange { number: 0, .. })
        ));
    }

    #[test]
    fn bad_forms() {
        assert!(matches!(
            parse_shorthand("40000"),
            Err(AddressError::OutOfRange { .. })
        ));
        assert!(matches!(
            parse_shorthand("20001"),
            Err(AddressError::UnknownTable { digit: '2', .. })
        ));
        assert!(matches!(
            parse_shorthand("565536"),
            Err(AddressError::UnknownTable { digit: '5', .. })
        ));
        for bad in ["", "4x001", "-1", " 40001", "4e4", "40001.0"] {
            assert!(
                matches!(parse_shorthand(bad), Err(AddressError::NotDigits(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_shorthand("4000001"),
            Err(AddressError::TooLong(_))
        ));
    }

    #[test]
    fn shorthand_round_trips() {
        for table in [
            Table::Coil,
            Table::DiscreteInput,
            Table::InputRegister,
            Table::HoldingRegister,
        ] {
            for offset in [0u16, 1, 9998, 9999, 65535] {
                let s = shorthand(table, u32::from(offset));
                assert_eq!(parse_shorthand(&s), Ok((table, offset)), "{s}");
            }
        }
        assert_eq!(shorthand(Table::HoldingRegister, 0), "40001");
        assert_eq!(shorthand(Table::HoldingRegister, 65535), "465536");
    }
}
